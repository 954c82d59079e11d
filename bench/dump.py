"""Benchmark: activation capture of `lens dump` (early exit) against a full-depth forward, in the same process.

    python bench/dump.py                                   # SmolLM2-135M, layer 15 of 30, CPU, ~1 min
    python bench/dump.py --samples 4096 --batch 64 --seq-len 128 --device cuda
    python bench/dump.py --model DIR --random-weights ...  # DIR: config.json + tokenizer only (same speed)

Early exit is `lens.data.dump.capture`: each batch is cut after its last explained position and the forward stops
after block `layer`. The reference is what research code typically does: a full-depth forward over the whole
context with `output_hidden_states=True` (and the LM head, as `model(...)` computes it), then indexing
`hidden_states[layer + 1]`. Both give the same activations (checked). The ideal speed-up from depth alone is
n_layers / (layer + 1); skipping the LM head can push the measured ratio above it, short contexts below it.

Then, unless `--no-s3`, the whole `lens dump` (capture + safetensors + upload + manifest) runs into a moto S3 server
on 127.0.0.1, and its end-to-end rate is printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from lens.config import from_dictconfig
from lens.data.corpus import Corpus
from lens.data.dump import capture, dump, split_samples
from lens.models.hub import load_model
from lens.models.orig import Orig


def full_depth(lm, input_ids: torch.Tensor, positions: torch.Tensor, layer: int, batch: int,
               device: torch.device) -> torch.Tensor:
    """The reference capture: full forward with output_hidden_states over the full context, (n, d) fp32."""
    out = []
    for s in range(0, len(input_ids), batch):
        ids, pos = input_ids[s:s + batch].to(device), positions[s:s + batch].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = lm(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
        out.append(hidden[torch.arange(len(pos), device=device), pos].float().cpu())
    return torch.cat(out)


def timed(fn, repeats: int):
    """(result, best seconds) over `repeats` runs after one warm-up."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def s3_dump(cfg_dict: dict, n: int) -> float:
    """Seconds for a whole `lens dump` of the config into a fresh bucket on a loopback moto server."""
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        cfg_dict = {**cfg_dict, "storage": {"endpoint_url": endpoint}}
        cfg_dict["data"] = {**cfg_dict["data"], "on_the_fly": False, "activations": "s3://bench/acts"}
        start = time.perf_counter()
        assert dump(from_dictconfig(cfg_dict))
        return time.perf_counter() - start
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-s3", action="store_true", help="skip the end-to-end dump into S3 on loopback")
    p.add_argument("--random-weights", action="store_true",
                   help="--model is a folder with config.json and tokenizer only: random weights, same speed")
    args = p.parse_args()
    device = torch.device(args.device)

    cfg_dict = {"model": {"name": args.model, "layer": args.layer},
                "data": {"corpus": "stdlib", "seq_len": args.seq_len, "max_sequences": args.samples + 1,
                         "val_fraction": 1 / (args.samples + 1), "shard_size": max(args.samples // 4, 1),
                         "dump_batch_size": args.batch},
                "wandb": {"mode": "disabled"}}
    cfg = from_dictconfig(cfg_dict)
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model)).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        args.no_s3 = True  # `lens dump` loads real weights
    else:
        lm, tokenizer = load_model(args.model)
    n_layers = lm.config.num_hidden_layers
    corpus = Corpus.build(cfg.data, tokenizer)
    samples = split_samples(corpus, "train", cfg.run.seed, cfg.data.min_pos, prime=False)
    ids, pos = samples.rows[:], samples.token_pos
    lm = lm.to(device)
    orig = Orig(lm)

    early, t_early = timed(lambda: capture(orig, ids, pos, [args.layer], args.batch, device)[args.layer], args.repeats)
    full, t_full = timed(lambda: full_depth(lm, ids, pos, args.layer, args.batch, device), args.repeats)
    err = float((early - full).abs().max() / full.abs().max())
    n = len(ids)
    ideal = n_layers / (args.layer + 1)
    print(f"{args.model} on {device}: {n} samples, seq_len {args.seq_len}, batch {args.batch}, layer {args.layer} "
          f"of {n_layers} (max rel diff early vs full {err:.1e})")
    print(f"early-exit dump capture   {n / t_early:9.1f} activations/s")
    print(f"full forward + hidden     {n / t_full:9.1f} activations/s")
    print(f"speed-up {t_full / t_early:.2f}x; ideal from depth n_layers/(layer+1) = {ideal:.2f}x "
          f"({t_full / t_early / ideal:.0%} of ideal)")
    if not args.no_s3:
        seconds = s3_dump(cfg_dict, n)
        total = n + len(corpus.val)
        print(f"lens dump into S3 on loopback (end to end, incl. model load and corpus): {total} activations in "
              f"{seconds:.1f} s = {total / seconds:.1f} activations/s")


if __name__ == "__main__":
    main()
