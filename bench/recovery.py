"""Benchmark: recovery from faults in local emulation (two torchrun agents, S3 on loopback), and checkpoint saves.

    python bench/recovery.py                    # a random 4-block Llama with SmolLM2's vocabulary, CPU, ~8 min
    python bench/recovery.py --faults 10 --d-model 512
    python bench/recovery.py --only weights     # just the weight-loading figures (model mirror vs local disk)

Trains a lens whose decoder and encoder bases are trainable (so checkpoints are large: weights plus two Adam
moments of two model copies) with `scripts/launch.py --local`'s machinery: two Worker pods as torchrun agents,
elastic between 1 and 2 nodes, checkpoints in a moto S3 server on 127.0.0.1. Faults cycle through: a worker
SIGKILLed, a SIGKILL while a checkpoint upload is in flight, a spot preemption (preStop hook + SIGTERM), and a node
lost (agent and workers SIGKILLed; its replacement starts once the survivor trains alone). Printed: per fault the
steps lost and the seconds from the fault to the next completed step; the median recovery; and the checkpoint save
(all ranks uploading their share at once) against a raw boto3 upload of the same objects from one process, as a
ratio measured in this process against the same server.

Weight loading (`--only weights`): a larger random Llama is put in an HF cache in the hub's layout (the "hub") under a
hub id, so `lens train` mirrors it once into the S3 server (`model.cache`, lens/models/mirror.py). Then, alternating:
a `lens train` whose model comes from the mirror is SIGKILLed after a completed step and started again as a fresh pod
would (no local copy of the model, the hub unreachable), against the same with `model.name` a local folder holding
the very same files. Printed: the seconds from the kill to the next completed step for each (medians, and their
ratio), and the in-process load time from the mirror into an empty local cache against `from_pretrained` of the
local folder (ratio). The run storage is local and the token store is built once, so the two differ in weight
loading only.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from transformers.utils import logging as hf_logging

from lens.config import load_config
from lens.launch import local_manifests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fault harness lives with the tests
from _chaos import S3_TEST_ENV, ChaosRun, FaultProxy, S3Server  # noqa: E402

KINDS = ("worker", "upload", "preempt", "node")


def random_llama(d_model: int, layers: int, out: Path) -> Path:
    """A random Llama with SmolLM2's tokenizer (converted once and cached by `make model`), saved to `out`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lens.models.hub import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
                         num_hidden_layers=layers, num_attention_heads=d_model // 64, num_key_value_heads=d_model // 64,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_config(model: Path, endpoint: str, steps: int, every: int) -> dict:
    return {
        "run": {"name": "bench-recovery", "dir": "s3://bench/recovery", "seed": 0},
        "model": {"name": str(model), "layer": 1},
        "decoder": {"prompt": "<bos>Explain <embed>:", "t_text": 4, "train_base": True},
        "encoder": {"prompt": "<bos><text> means", "train_base": True},
        "loss": {"lm_prefix": "<bos>Explain something:"},
        "data": {"corpus": "stdlib", "seq_len": 24, "max_sequences": 2000},
        "optim": {"warmup": "1s"},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 4, "checkpoint_every": every,
                  "log_every": 1, "eval_every": 0, "eval_samples": 16, "keep_checkpoints": 2},
        "storage": {"endpoint_url": endpoint},
        "wandb": {"mode": "disabled"},
    }


def raw_upload_seconds(server: S3Server, prefix: str) -> tuple[float, int]:
    """Seconds to upload the objects under `prefix` again with plain boto3 from one process, and their bytes."""
    s3 = server.client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="bench", Prefix=prefix)["Contents"]]
    blobs = {k: s3.get_object(Bucket="bench", Key=k)["Body"].read() for k in keys}
    start = time.perf_counter()
    for key, data in blobs.items():
        s3.upload_fileobj(io.BytesIO(data), "bench", f"raw/{key}")
    return time.perf_counter() - start, sum(len(b) for b in blobs.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("faults", "weights"), help="run one part (default: both)")
    p.add_argument("--faults", type=int, default=4, help="faults to inject, cycling through the four kinds")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--every", type=int, default=5, help="train.checkpoint_every")
    p.add_argument("--load-d-model", type=int, default=1024, help="weight loading: d_model of the mirrored Llama")
    p.add_argument("--load-layers", type=int, default=8, help="weight loading: its blocks")
    p.add_argument("--load-repeats", type=int, default=3, help="weight loading: restarts (and loads) per variant")
    p.add_argument("--echo", action="store_true", help="print the run's log")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars in the report

    code = 0
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        tmp = Path(tmp)
        for key, value in {**S3_TEST_ENV, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                           "AWS_CONFIG_FILE": str(tmp / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")}.items():
            os.environ[key] = value
        server = S3Server(tmp / "moto.log")
        server.client().create_bucket(Bucket="bench")
        try:
            if args.only in (None, "weights"):
                weight_loading(args, tmp / "weights", server)
            if args.only in (None, "faults"):
                code = faults(args, tmp / "faults", server)
        finally:
            server.stop()
    sys.exit(code)


def faults(args: argparse.Namespace, tmp: Path, server: S3Server) -> int:
    """The fault run: prints its report and returns the run's exit code."""
    tmp.mkdir()
    steps = 30 + 10 * args.faults
    proxy = FaultProxy(server.port)
    model = random_llama(args.d_model, args.layers, tmp / "model")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(model, f"http://127.0.0.1:{proxy.port}", steps, args.every)))
    docs = local_manifests(load_config(config), {"workers": {"minReplicas": 1, "maxReplicas": 2}}, workers=2)
    os.chdir(tmp)
    try:
        with ChaosRun(docs, tmp / "wandb-local" / "events.jsonl", echo=args.echo, seed=0) as run:
            run.wait_step(args.every + 2)
            for i in range(args.faults):
                kind = KINDS[i % len(KINDS)]
                if kind == "worker":
                    run.kill_worker()
                elif kind == "upload":
                    run.kill_during_upload(proxy)
                elif kind == "preempt":
                    run.preempt_node(down_s=1.0)
                else:
                    run.kill_node(down_s=None)
                    mark = len(run.events)
                    run.restore_node(run.lost)
                    run.wait_world(2, since=mark)
                run.wait_step(run.last_step() + 2)
            code = run.finish(1800)
        saves = run.save_times()
        raw_s, raw_bytes = raw_upload_seconds(server, f"recovery/checkpoints/{_latest(server)}/")
        single_s = single_process_save_seconds(server)
    finally:
        proxy.release()

    print(f"run exit code {code}; {steps} steps, checkpoint every {args.every}, {len(run.faults)} faults")
    for f in run.faults:
        print(f"  {f.kind:<34} at step {f.at_step:>4}  resumed {f.resumed_step:>4}  lost {f.steps_lost:>2} steps  "
              f"world {f.world}  recovery {f.recovery_s:6.1f} s")
    recovery = [f.recovery_s for f in run.faults]
    print(f"median recovery (fault -> next completed step): {statistics.median(recovery):.1f} s "
          f"(min {min(recovery):.1f}, max {max(recovery):.1f})")
    print(f"steps lost per fault: {[f.steps_lost for f in run.faults]} (checkpoint interval {args.every})")
    two_rank = [s for mb, s, world in saves if world == 2]
    save_s = statistics.median(two_rank)
    mb = saves[-1][0]
    print(f"checkpoint save: {mb:.0f} MB of tensors in {save_s:.2f} s (median of {len(two_rank)} saves by 2 ranks) "
          f"= {mb / save_s:.0f} MB/s; raw boto3 upload of the same {raw_bytes / 1e6:.0f} MB from one "
          f"process: {raw_s:.2f} s = {raw_bytes / 1e6 / raw_s:.0f} MB/s; ratio raw/save = {raw_s / save_s:.2f}x")
    print(f"the same checkpoint saved by CheckpointManager in this one process (serialize, upload, marker, pointer): "
          f"{single_s:.2f} s; ratio raw/save = {raw_s / single_s:.2f}x")
    return code


# --------------------------------------------------------------------------------------------- weight loading
HUB_ID = "bench/recovery-llama"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def weight_loading(args: argparse.Namespace, tmp: Path, server: S3Server) -> None:
    """Restarts with the model read from the S3 mirror against the same files read from local disk; prints them."""
    from lens.models import mirror
    from lens.models.hub import load_model
    from lens.storage import open_storage

    repo = tmp / "hub" / "models--bench--recovery-llama"
    snapshot = random_llama(args.load_d_model, args.load_layers, repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    local = tmp / "local-model"  # the very files the mirror holds, as a local folder
    local.mkdir()
    for name in mirror.snapshot_files(snapshot):
        shutil.copyfile(snapshot / name, local / name)
    mb = sum((local / n).stat().st_size for n in os.listdir(local) if n.endswith(".safetensors")) / 1e6
    (tmp / "no-hub").mkdir()
    env = {**os.environ, "LENS_CACHE": str(tmp / "pod-cache"), "HF_HUB_CACHE": str(tmp / "no-hub"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    configs = {}
    for variant, model in (("mirror", HUB_ID), ("local", str(local))):
        cfg = run_config(model, server.endpoint, 100000, 1)
        cfg["run"]["dir"] = str(tmp / f"run-{variant}")
        cfg["model"]["cache"] = "s3://bench/models"
        cfg["decoder"]["train_base"] = cfg["encoder"]["train_base"] = False  # small checkpoints: the model dominates
        configs[variant] = tmp / f"{variant}.yaml"
        configs[variant].write_text(yaml.safe_dump(cfg))

    # The first start reads the "hub" (and builds the token store, which every later start reuses) and mirrors.
    first = Trainer(configs["mirror"], tmp / "run-mirror", {**env, "HF_HUB_CACHE": str(tmp / "hub")}, tmp / "log")
    first_s = first.wait("step") - first.started
    warm = {"mirror": first}
    restarts: dict[str, list[float]] = {"mirror": [], "local": []}
    for _ in range(args.load_repeats):  # alternating, so both see the same load of this machine
        for variant in ("mirror", "local"):
            trainer = warm.pop(variant, None) or Trainer(configs[variant], tmp / f"run-{variant}", env, tmp / "log")
            trainer.wait("checkpoint")  # killed once it has committed one, so the restart resumes from it
            killed = trainer.kill()
            shutil.rmtree(tmp / "pod-cache" / "models", ignore_errors=True)  # a fresh pod: no local copy of the model
            again = Trainer(configs[variant], tmp / f"run-{variant}", env, tmp / "log")
            restarts[variant].append(again.wait("step") - killed)
            again.kill()

    # In this process: the load alone, from the mirror into an empty local cache against from_pretrained of the folder.
    os.environ["LENS_CACHE"] = str(tmp / "inproc-cache")
    store = open_storage("s3://bench/models", server.endpoint).sub(mirror.mirror_key(HUB_ID, "main"))
    folder = mirror.read_manifest(store)["folder"]
    loads: dict[str, list[float]] = {"mirror": [], "local": [], "raw": []}
    for _ in range(args.load_repeats):
        shutil.rmtree(tmp / "inproc-cache", ignore_errors=True)
        for variant, name, at in (("mirror", HUB_ID, store), ("local", str(local), None)):
            start = time.perf_counter()
            load_model(name, mirror_at=at)
            loads[variant].append(time.perf_counter() - start)
        # The server's own pace: the same objects with a plain boto3 download_file each, one after another.
        raw = tmp / "raw"
        raw.mkdir(exist_ok=True)
        start = time.perf_counter()
        for name in os.listdir(local):
            server.client().download_file("bench", f"models/{HUB_ID}@main/{folder}/{name}", str(raw / name))
        loads["raw"].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in restarts.items()}
    load_med = {k: statistics.median(v) for k, v in loads.items()}
    print(f"weight loading: random Llama d_model {args.load_d_model} x {args.load_layers} blocks, {mb:.0f} MB of "
          f"safetensors, mirrored in s3://bench/models on the loopback moto server")
    print(f"  first start (reads the hub, uploads the mirror, builds the token store) -> first step: {first_s:.1f} s")
    print(f"  SIGKILL -> next completed step, a fresh pod (no local copy, hub unreachable): model from the S3 mirror "
          f"{med['mirror']:.1f} s, from local disk {med['local']:.1f} s (medians of {args.load_repeats}: "
          f"{_secs(restarts['mirror'])} / {_secs(restarts['local'])}); restart ratio mirror/local = "
          f"{med['mirror'] / med['local']:.2f}x")
    print(f"  model load in one process: from the S3 mirror into an empty local cache {load_med['mirror']:.2f} s "
          f"({mb / load_med['mirror']:.0f} MB/s), from_pretrained of the local folder {load_med['local']:.2f} s; "
          f"load ratio mirror/local = {load_med['mirror'] / load_med['local']:.2f}x; a plain boto3 download of the "
          f"same objects {load_med['raw']:.2f} s ({mb / load_med['raw']:.0f} MB/s), ratio raw/mirror load = "
          f"{load_med['raw'] / load_med['mirror']:.2f}x")


def _secs(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


class Trainer:
    """One `lens train` process of the weight-loading part (its output appended to `log`), followed through the
    events.jsonl of its local run.dir."""

    def __init__(self, config: Path, run_dir: Path, env: dict, log: Path):
        self.events = run_dir / "events.jsonl"
        self.offset = self.events.stat().st_size if self.events.exists() else 0
        self.started = time.time()
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "lens", "train", str(config)], env=env,
                                         cwd=run_dir.parent, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, kind: str, timeout: float = 900) -> float:
        """The wall-clock time of this process's first event of `kind` ("step": a completed step, "checkpoint")."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lens train exited {self.proc.returncode} before a {kind}; see its log")
            if self.events.exists():
                with open(self.events, "rb") as f:
                    f.seek(self.offset)
                    for line in f.read().splitlines():
                        record = json.loads(line)
                        if record["event"] == kind:
                            return record["time"]
            time.sleep(0.05)
        raise TimeoutError(f"no {kind} within {timeout:.0f} s")

    def kill(self) -> float:
        killed = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return killed


def single_process_save_seconds(server: S3Server) -> float:
    """Seconds for `CheckpointManager.save` of the run's last checkpoint from this one process (world 1) into a
    fresh prefix of the same server: the save path without the trainers, next to the raw upload."""
    from lens.storage import open_storage
    from lens.train.checkpoint import CheckpointManager, load_checkpoint

    ckpt = load_checkpoint("s3://bench/recovery", server.endpoint)
    manager = CheckpointManager(open_storage("s3://bench/single", server.endpoint))
    start = time.perf_counter()
    manager.save(ckpt.step, ckpt.read(), ckpt.state, ckpt.config_yaml)
    return time.perf_counter() - start


def _latest(server: S3Server) -> str:
    return server.client().get_object(Bucket="bench", Key="recovery/checkpoints/latest")["Body"].read().decode()


if __name__ == "__main__":
    main()
