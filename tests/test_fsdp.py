"""Sharded training: real torchrun processes (2 gloo ranks on CPU) training the tiny lens with trainable bases.

What the sharding issue asks to be shown: FSDP training equals single-process training within 1e-5 after 5 steps
(the same global batch, split unevenly over the ranks so one rank runs a weight-0 padding micro-batch); DDP at
world 2 too; `train.parallel` resolves as documented; building the trainer under FSDP never holds a whole fp32
copy (its peak measured against the plan); DDP searches for unused parameters exactly when the config leaves some.
The memory plan itself is tested in tests/test_memory.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, helper_world, make_corpus, rel_diff, tiny_run_config, torchrun

STEPS = 5

# Trains STEPS optimizer steps through the Trainer's own train_step (no checkpoint: that is issue 11b's code), then
# rank 0 writes the full weights (shards gathered) and each rank its mode and sharded parameter types.
HELPER = textwrap.dedent("""
    import sys
    import torch
    from torch.distributed.tensor import DTensor
    from lens.config import load_config
    from lens.train import dist
    from lens.train.loop import Meter, Trainer

    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(config, overrides))

    def full_state():
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in trainer.model.trainable_parameters().items()}

    init = full_state()
    for _ in range(%d):
        trainer.train_step(Meter())
    state = full_state()
    kinds = sorted({type(p).__name__ for p in trainer.model.trainable_parameters().values()})
    if trainer.dist.rank == 0:
        torch.save({"init": init, "state": state, "mode": trainer.parallel.mode, "kinds": kinds,
                    "grad_norm": trainer.last["grad_norm"]}, out)
    dist.shutdown(finished=True)
    dist.exit_process(0)
""" % STEPS)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_files):
    root = tmp_path_factory.mktemp("fsdp")
    # batch 5 over 2 ranks: shares of 3 and 2 samples, micro-batches of 2 -> rank 1 pads with one weight-0 forward.
    cfg = tiny_run_config(tiny_files, "tiny-fsdp", root / "run",
                          decoder={"train_base": True}, encoder={"train_base": True},
                          train={"max_steps": STEPS, "batch_size": 5, "micro_batch_size": 2})
    return helper_world(root, cfg, HELPER)


def trained(world, name: str, nproc: int, *overrides: str) -> dict:
    out = world["root"] / f"{name}.pt"
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    proc = subprocess.run(launcher + [str(world["helper"]), str(world["config"]), str(out), *overrides],
                          cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return torch.load(out)


@pytest.fixture(scope="module")
def single(world) -> dict:
    return trained(world, "single", 1)


def agrees(a: dict, b: dict) -> bool:
    """The whole trainable state within 1e-5 (relative norm of the difference over all tensors), each tensor within
    1e-4. Ranks sum gradients in another order than one process (gradient norms agree to 1e-7), and AdamW divides
    each element's gradient by its own RMS, so an element whose gradient is at rounding level moves by an amount that
    noise sets: one small tensor (the decoder's left prompt, norm 0.5) then differs by 1.3e-5 while the whole state
    agrees to 3.5e-7."""
    whole = sum(float((a[k] - b[k]).pow(2).sum()) for k in b) ** 0.5 / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return whole < 1e-5 and rel_diff(a, b) < 1e-4


@pytest.mark.slow
def test_fsdp_at_world_2_equals_one_process(world, single):
    fsdp = trained(world, "fsdp", 2)  # train.parallel=auto with trainable bases and 2 ranks
    assert single["mode"] == "ddp" and fsdp["mode"] == "fsdp"
    assert fsdp["kinds"] == ["DTensor"], "under FSDP every trainable parameter is a shard"
    assert rel_diff(single["state"], single["init"]) > 1e-3  # the weights really moved
    assert agrees(fsdp["state"], single["state"])
    assert fsdp["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_ddp_at_world_2_equals_one_process(world, single):
    ddp = trained(world, "ddp", 2, "train.parallel=ddp")
    assert ddp["mode"] == "ddp" and ddp["kinds"] == ["Parameter"]
    assert agrees(ddp["state"], single["state"])


# Building the trainer under FSDP: its resident-memory peak on each rank, with warm imports (a first Trainer built and
# dropped), against the plan's frozen model + this rank's fp32 shards.
INIT_HELPER = textwrap.dedent("""
    import ctypes, gc, json, sys
    from pathlib import Path
    from lens.config import load_config
    from lens.train import dist
    from lens.train.loop import Trainer

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    config, out = sys.argv[1], sys.argv[2]
    cfg = load_config(config, [])
    Trainer(cfg)  # built once and dropped: imports, the activation cache
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
    before = rss("VmRSS")
    trainer = Trainer(cfg)
    shards = all(type(p).__name__ == "DTensor" for p in trainer.model.trainable_parameters().values())
    Path(f"{out}.{trainer.dist.rank}").write_text(json.dumps(
        {"peak": rss("VmHWM") - before, "mode": trainer.parallel.mode, "shards": shards}))
    dist.shutdown(finished=True)
    dist.exit_process(0)
""")


@pytest.mark.slow
def test_building_under_fsdp_never_holds_a_whole_fp32_copy(tmp_path, tokenizer):
    """The trainable copies are sharded before they get weights: building peaks at the frozen model plus this rank's
    shards (measured on CPU, where the device is host memory), not at whole copies sharded afterwards (ratio 1.5)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from lens.config import load_config
    from lens.launch import memory

    # Copies big enough (17.7M parameters) for resident memory to tell one fp32 copy from two.
    torch.manual_seed(0)
    model = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=384, intermediate_size=1536,
                                 num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=0)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    (tmp_path / "corpus.txt").write_text(make_corpus())
    cfg = tiny_run_config({"model_dir": model, "corpus": tmp_path / "corpus.txt"}, "build", tmp_path / "run",
                          decoder={"train_base": True}, encoder={"train_base": True}, train={"parallel": "fsdp"})
    world = helper_world(tmp_path, cfg, INIT_HELPER)
    # Large freed blocks go back to the OS, so resident memory follows the live tensors (as in bench/memory.py).
    proc = subprocess.run(torchrun(2) + [str(world["helper"]), str(world["config"]), str(tmp_path / "out")],
                          cwd=tmp_path, env={**world["env"], "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    plan = memory.plan(load_config(str(world["config"]), []), memory.model_shapes(str(model)), 2, "fsdp", gpu=False)
    for rank in range(2):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        assert got["mode"] == "fsdp" and got["shards"]
        ratio = got["peak"] / (plan.frozen + plan.weights)
        assert ratio < 1.25, f"rank {rank}: building peaked at {got['peak'] / 2**20:.0f} MiB = {ratio:.2f} x plan"


def test_parallel_auto_resolves_to_fsdp_only_for_trainable_bases_on_several_ranks():
    from lens.config import load_config
    from lens.train.parallel import resolve_mode

    conf = str(REPO / "conf" / "smollm2_135m.yaml")
    frozen = load_config(conf, [])
    trainable = load_config(conf, ["decoder.train_base=true"])
    assert [resolve_mode(frozen, 8), resolve_mode(trainable, 1), resolve_mode(trainable, 2)] == ["ddp", "ddp", "fsdp"]
    assert resolve_mode(load_config(conf, ["train.parallel=fsdp"]), 2) == "fsdp"


def test_unknown_parallel_mode_exits_2_naming_the_key(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lens", "train", str(REPO / "conf" / "smollm2_135m.yaml"),
                           "train.parallel=zero3"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.parallel" in proc.stderr and "auto, ddp, fsdp" in proc.stderr


# find_unused_parameters: computed from the config (lens.train.parallel.unused_parameters). DDP without it fails on
# the second step when a parameter got no gradient in the first, so two steps under DDP are the check.
UNUSED_CASES = {
    "frozen bases": ({}, False),
    "trainable decoder base": ({"decoder": {"train_base": True}}, False),
    "patched layers with their own projections": ({"decoder": {"patch_layers": 2, "per_layer_proj": True}}, False),
    "GRPO, trainable decoder base": ({"decoder": {"train_base": True},
                                      "loss": {"grpo_weight": 1.0, "group_size": 2, "mse_weight": 1.0,
                                               "kl_weight": 0.0, "lm_weight": 0.0}}, False),
    "GRPO, trainable decoder base, one token": ({"decoder": {"train_base": True, "t_text": 1},
                                                 "loss": {"grpo_weight": 1.0, "group_size": 2, "mse_weight": 1.0,
                                                          "kl_weight": 0.0, "lm_weight": 0.0}}, True),
    "trainable encoder base": ({"encoder": {"train_base": True}}, True),  # its blocks past encoder.layer never run
    "empty left prompts": ({"encoder": {"prompt": "<text> means"}, "decoder": {"prompt": "<embed> means"}}, True),
}


def _ddp_steps(tiny_files, tmp_path, monkeypatch, sections: dict, steps: int = 2):
    import yaml

    from lens.config import load_config
    from lens.train import dist
    from lens.train.loop import Meter, Trainer

    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    raw = tiny_run_config(tiny_files, "unused", tmp_path / "run", train={"parallel": "ddp", "batch_size": 2})
    for name, values in sections.items():
        raw[name].update(values)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(str(tmp_path / "cfg.yaml"), [])
    try:
        trainer = Trainer(cfg)  # one process: DDP over a group of one, as a single-GPU job runs
        for _ in range(steps):
            trainer.train_step(Meter())
        return cfg, trainer
    finally:
        dist.shutdown()


@pytest.mark.parametrize("case", list(UNUSED_CASES))
def test_ddp_looks_for_unused_parameters_only_when_the_config_leaves_some(tiny_files, tmp_path, monkeypatch, case):
    from lens.train.parallel import unused_parameters

    sections, needed = UNUSED_CASES[case]
    cfg, trainer = _ddp_steps(tiny_files, tmp_path, monkeypatch, sections)
    assert unused_parameters(cfg, trainer.model) is needed and trainer.parallel._ddp.find_unused_parameters is needed
    got_none = [n for n, p in trainer.model.trainable_parameters().items() if p.grad is None]
    assert bool(got_none) is needed, got_none


@pytest.mark.parametrize("case", [c for c, (_, needed) in UNUSED_CASES.items() if needed])
def test_ddp_without_the_unused_search_fails_where_the_config_needs_it(tiny_files, tmp_path, monkeypatch, case):
    """The cases above that get the search need it: without it, DDP's second step raises."""
    from lens.train import parallel

    monkeypatch.setattr(parallel, "unused_parameters", lambda cfg, model: False)
    with pytest.raises(RuntimeError, match="did not receive grad"):
        _ddp_steps(tiny_files, tmp_path, monkeypatch, UNUSED_CASES[case][0])
