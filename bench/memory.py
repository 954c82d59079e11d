"""The memory plan (lens/launch/memory.py) against measured peaks.

    python bench/memory.py            # a random Llama with trainable copies, DDP and FSDP at world 2, CPU, ~3 min
    python bench/memory.py --d-model 1024 --layers 8

Each mode runs 2 ranks under torchrun (gloo). Every rank records its resident memory after the process group is up
(the baseline: Python, torch, transformers), builds the trainer, restarts its high-water mark and trains two steps;
measured = that high-water mark - the baseline (the peak of building the trainer is printed beside it: under FSDP
the frozen model and this rank's shards, as the copies are sharded before they get weights). The plan is computed
from the model's config.json on the meta device, with CPU dtypes (fp32 compute). Prints one `memory ratio` line per
mode and rank: measured peak / plan (goal 0.85-1.15). Then each rank saves a checkpoint (DCP, every rank writing
what it owns) with its high-water mark restarted: `save memory ratio` = that save's host-memory peak / (checkpoint
size / world) (goal <= 1.5; nothing gathers the whole state on one rank).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 1024 ** 3


def _rss(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(config: str, out: str) -> None:
    """One rank: baseline, Trainer, two optimizer steps, high-water mark."""
    from lens.config import load_config
    from lens.train import dist
    from lens.train.loop import Meter, Trainer

    cfg = load_config(config, [])
    dist.init(timeout_s=300)
    dist.barrier()
    base = _rss("VmRSS")
    trainer = Trainer(cfg)
    built = _rss("VmHWM") - base  # building's peak (DDP: whole copies; FSDP: this rank's shards)
    # Training's own peak: hand freed heap back to the OS, then restart the high-water mark (clear_refs 5).
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(2):
        trainer.train_step(Meter())
    peak = _rss("VmHWM")
    # A sharded save's own host-memory peak: the high-water mark restarted at the resident state.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before_save = _rss("VmRSS")
    trainer.save()
    save_peak = _rss("VmHWM") - before_save
    folder = Path(cfg.run.dir) / "checkpoints" / f"step-{trainer.step:08d}"
    state_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".distcp")
    Path(f"{out}.{trainer.dist.rank}").write_text(json.dumps({"mode": trainer.parallel.mode, "measured": peak - base,
                                                              "built": built, "save_peak": save_peak,
                                                              "state_bytes": state_bytes}))
    dist.shutdown()


def random_llama(d_model: int, layers: int, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lens.models.hub import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=4 * d_model,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)

    from lens.config import load_config
    from lens.launch import memory

    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = random_llama(args.d_model, args.layers, root / "model")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"Line {i}: the river carried {i % 7} boats past the old mill." for i in range(400)))
    # Blocks over 128 KiB are mmap-ed and go back to the OS when freed, so resident memory follows live tensors
    # (glibc would otherwise keep FSDP's freed gather buffers in its heap and the high-water mark with them).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    shapes = memory.model_shapes(str(model))
    for mode in ("ddp", "fsdp"):
        raw = {"run": {"name": f"bench-{mode}", "dir": str(root / mode)},
               "model": {"name": str(model), "layer": args.layers - 2, "dtype": "float32"},
               "decoder": {"prompt": "<|im_start|>Explain <embed>:", "t_text": 4, "train_base": True},
               "encoder": {"prompt": "<|im_start|><text> means", "train_base": True},
               "loss": {"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.0},
               "data": {"corpus": str(corpus), "seq_len": 32},
               "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "parallel": mode,
                         "eval_every": 0, "eval_samples": 8},
               "wandb": {"mode": "disabled"}}
        config = root / f"{mode}.yaml"
        config.write_text(yaml.safe_dump(raw))
        out = root / f"{mode}.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        __file__, "--worker", str(config), str(out)], env=env, check=True, cwd=root,
                       stdout=subprocess.DEVNULL)
        planned = memory.plan(load_config(str(config), []), shapes, 2, mode, gpu=False)
        for rank in range(2):
            got = json.loads(Path(f"{out}.{rank}").read_text())
            assert got["mode"] == mode
            print(f"{mode} rank {rank}: measured peak {got['measured'] / GIB:.3f} GiB, plan {planned.total / GIB:.3f} "
                  f"GiB (weights {planned.weights / GIB:.3f} gathered {planned.gathered / GIB:.3f} grads "
                  f"{planned.gradients / GIB:.3f} adamw {planned.optimizer / GIB:.3f} frozen "
                  f"{planned.frozen / GIB:.3f} activations {planned.activations / GIB:.3f})")
            print(f"{mode} rank {rank}: memory ratio {got['measured'] / planned.total:.2f} (measured / plan; "
                  f"building peaked at {got['built'] / GIB:.3f} GiB)")
            share = got["state_bytes"] / 2
            print(f"{mode} rank {rank}: save memory ratio {got['save_peak'] / share:.2f} (host-memory peak during "
                  f"the sharded save {got['save_peak'] / GIB:.3f} GiB / (state {got['state_bytes'] / GIB:.3f} GiB / "
                  f"world 2))")


if __name__ == "__main__":
    main()
