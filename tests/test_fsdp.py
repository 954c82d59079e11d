"""Sharded training: real torchrun processes (2 gloo ranks on CPU) training the tiny lens with trainable bases.

What the sharding issue asks to be shown: FSDP training equals single-process training within 1e-5 after 5 steps
(the same global batch, split unevenly over the ranks so one rank runs a weight-0 padding micro-batch); DDP at
world 2 too; `train.parallel` resolves as documented; the memory plan (tests/test_memory.py) is separate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, helper_world, rel_diff, tiny_run_config, torchrun

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
    dist.shutdown()
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


@pytest.mark.slow
def test_fsdp_at_world_2_equals_one_process(world, single):
    fsdp = trained(world, "fsdp", 2)  # train.parallel=auto with trainable bases and 2 ranks
    assert single["mode"] == "ddp" and fsdp["mode"] == "fsdp"
    assert fsdp["kinds"] == ["DTensor"], "under FSDP every trainable parameter is a shard"
    assert rel_diff(single["state"], single["init"]) > 1e-3  # the weights really moved
    assert rel_diff(fsdp["state"], single["state"]) < 1e-5
    assert fsdp["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_ddp_at_world_2_equals_one_process(world, single):
    ddp = trained(world, "ddp", 2, "train.parallel=ddp")
    assert ddp["mode"] == "ddp" and ddp["kinds"] == ["Parameter"]
    assert rel_diff(ddp["state"], single["state"]) < 1e-5


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
