"""Benchmark: checkpoint saves into S3 (a moto server on 127.0.0.1) against a raw upload, and async saves.

    python bench/checkpoint.py              # 256 MB of fp32 tensors, 3 repeats, ~1 min
    python bench/checkpoint.py --mb 1024 --threads 8

One process (world 1) saves a DCP state dict of `--mb` MB (weights and two Adam-like moments) with
`CheckpointManager.save`: planning, serialization, `--threads` upload streams through s3torchconnector, the small
objects, the COMMITTED marker, the `latest` pointer. The raw upload sends the very objects that save wrote (read
back first) through the same library's client, on as many threads, from the same process, with nothing else around
it. Printed, medians of `--repeats`:

  save ratio           raw upload s / checkpoint save s (goal >= 0.8: the save adds little to moving the bytes)
  async blocked ratio  seconds a training step is blocked by an async save (start_save until it returns, plus the
                       commit once the upload is done) / the synchronous save (goal <= 0.1), for the saves after
                       a run's first (which allocates the host copy they reuse; printed beside it)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the S3 server helper lives with the tests
from _chaos import S3_TEST_ENV, S3Server  # noqa: E402


def state(mb: int) -> dict:
    """`mb` MB of fp32: weights and two moments of 8 equal tensors, as training_state() lays them out."""
    n = mb * 1_000_000 // 4 // 24
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(8)}
    moments = {name: {"exp_avg": w * 0.1, "exp_avg_sq": w * w, "step": torch.tensor(10.0)}
               for name, w in weights.items()}
    return {"model": weights, "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4,
                                                                                 "params": list(weights)}]}}


def raw_upload(storage, keys: list[str], blobs: list[bytes], threads: int) -> float:
    """Seconds to PUT `blobs` under `keys` through s3torchconnector's client, `threads` at once."""
    region, client = storage._dcp_client()

    def put(key_blob):
        key, blob = key_blob
        writer = client.put_object(storage.bucket, f"{storage.prefix}/{key}")
        view = memoryview(blob)
        for start in range(0, len(view), 8 << 20):  # the chunked writes DCP's stream makes
            writer.write(view[start:start + (8 << 20)])
        writer.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, zip(keys, blobs)))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--threads", type=int, default=None, help="upload streams (default: the trainer's)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.update(S3_TEST_ENV)

    from lens.storage import open_storage
    from lens.train.checkpoint import WRITE_THREADS, CheckpointManager

    threads = args.threads or WRITE_THREADS
    tensors = state(args.mb)
    nbytes = sum(t.numel() * t.element_size() for t in tensors["model"].values()) * 3
    server = S3Server(Path(tempfile.mkdtemp(prefix="bench-checkpoint-")) / "moto.log")
    try:
        server.client().create_bucket(Bucket="bench")
        saves, raws, blocked = [], [], []
        # One manager for the async saves, as a training run has: its first save allocates the host copy the
        # later ones reuse.
        later = CheckpointManager(open_storage("s3://bench/async", server.endpoint), write_threads=threads)
        for r in range(args.repeats + 1):
            storage = open_storage(f"s3://bench/sync{r}", server.endpoint)
            manager = CheckpointManager(storage, write_threads=threads)
            start = time.perf_counter()
            manager.save(1, tensors, {"cursor": 1}, "a: 1\n")
            saves.append(time.perf_counter() - start)

            folder = storage.sub("checkpoints/step-00000001")
            keys = [k for k in folder.list() if k.endswith(".distcp")]
            blobs = [folder.read_bytes(k) for k in keys]
            raws.append(raw_upload(open_storage(f"s3://bench/raw{r}", server.endpoint), keys, blobs, threads))

            start = time.perf_counter()
            pending = later.start_save(r + 1, tensors, {"cursor": 1}, "a: 1\n")
            returned = time.perf_counter() - start
            while not pending.done():  # training would go on here
                time.sleep(0.005)
            start = time.perf_counter()
            pending.finish()
            blocked.append(returned + time.perf_counter() - start)
    finally:
        server.stop()

    first_blocked = blocked.pop(0)
    saves, raws = saves[1:], raws[1:]  # the first repeat warms up the server as well
    save_s, raw_s, blocked_s = statistics.median(saves), statistics.median(raws), statistics.median(blocked)
    print(f"checkpoint of {nbytes / 1e6:.0f} MB into S3 (moto on 127.0.0.1), {threads} upload threads, median of "
          f"{args.repeats}: save {save_s:.2f} s = {nbytes / 1e6 / save_s:.0f} MB/s; raw s3torchconnector upload of "
          f"the same objects {raw_s:.2f} s = {nbytes / 1e6 / raw_s:.0f} MB/s")
    print(f"save ratio {raw_s / save_s:.2f} (raw upload s / checkpoint save s; goal >= 0.8)")
    print(f"async blocked ratio {blocked_s / save_s:.3f} (a step blocked {blocked_s:.3f} s by an async save / the "
          f"synchronous save {save_s:.2f} s; goal <= 0.1; the run's first async save, which allocates the host "
          f"copy, blocked {first_blocked:.3f} s)")


if __name__ == "__main__":
    main()
