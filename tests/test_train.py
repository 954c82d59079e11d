"""The trainer end to end: real `lens train` / torchrun processes on CPU with a tiny Llama, real files.

What the trainer issue asks to be shown: ranks stay bit-identical under DDP and gradients are really all-reduced;
resume is exact (bitwise with the same world size; the same samples and noise, weights to 1e-5, after 1 -> 2
processes); a finished run exits 0 and a rerun trains nothing; a checkpoint holds the expected files.

Runs are shared through module-scoped fixtures so each process is started once:
  straight  1 process, 2N steps                                          (the reference)
  resumed   1 process, N steps (train.max_steps=N), then the same command with train.max_steps=2N
  resized   the resumed run dir copied at step N, continued to 2N by 2 torchrun processes
The config uses `optim.decay: constant`: the cosine decay is a function of train.max_steps, so a first half run with
max_steps=N would follow another LR curve than the straight 2N run (that is the schedule's definition, not a resume
bug); with a constant LR stopping via max_steps is the same as being stopped at step N.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from lens.storage import open_storage
from lens.train.checkpoint import WRITE_THREADS, CheckpointManager, load_checkpoint

from conftest import helper_world, rel_diff, tiny_run_config, torchrun

N = 3  # optimizer steps per half
BATCH = 6
CKPT_FILES = {".metadata", "rng.pt", "state.json", "config.yaml", "COMMITTED"}  # + DCP's files of each rank

HELPER = textwrap.dedent("""
    # Trains like `lens train`, then every rank saves its own trainable weights beside the checkpoints.
    import sys
    import safetensors.torch
    from lens.config import load_config
    from lens.train import dist
    from lens.train.loop import Trainer

    config, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    trainer = Trainer(load_config(config, overrides))
    safetensors.torch.save_file(trainer.model.trainable_state(), f"{out}/init{trainer.dist.rank}.safetensors")
    trainer.fit()
    safetensors.torch.save_file(trainer.model.trainable_state(), f"{out}/rank{trainer.dist.rank}.safetensors")
    dist.shutdown(finished=True)
    dist.exit_process(0)
""")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_files):
    """A tiny Llama + tokenizer saved as an HF folder, a text corpus, a config file and the subprocess env."""
    root = tmp_path_factory.mktemp("train")
    cfg = tiny_run_config(tiny_files, "tiny-lens", root / "unused",
                          train={"max_steps": 2 * N, "batch_size": BATCH, "checkpoint_every": N})
    return helper_world(root, cfg, HELPER)


def run(world, args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lens ARGS` in a fresh process (or `nproc` torchrun workers); returns the finished process."""
    cmd = torchrun(nproc) + ["-m", "lens", *args] if nproc > 1 else [sys.executable, "-m", "lens", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - start
    return proc


def train(world, run_dir: Path, steps: int, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = run(world, ["train", str(world["config"]), f"run.dir={run_dir}", f"train.max_steps={steps}"], nproc)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_lines(run_dir: Path) -> dict[int, dict]:
    """Per-step training records of metrics.jsonl by step (a step logged twice would be a resume bug)."""
    rows = [m for m in metrics(run_dir) if "train/loss" in m]
    by_step = {m["step"]: m for m in rows}
    assert len(by_step) == len(rows), f"a step was logged twice: {[m['step'] for m in rows]}"
    return by_step


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not (a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])):
            pytest.fail(f"{k} differs: max |diff| {float((a[k] - b[k]).abs().max()):.3g}", pytrace=False)


def assert_same_state(a, b, path: str = "optimizer") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)):
            pytest.fail(f"{path} differs", pytrace=False)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


# ------------------------------------------------------------------------------------------------ shared runs


@pytest.fixture(scope="module")
def straight(world):
    """1 process, 2N steps in one go."""
    run_dir = world["root"] / "straight"
    proc = train(world, run_dir, 2 * N)
    return {"dir": run_dir, "proc": proc}


@pytest.fixture(scope="module")
def resumed(world):
    """1 process: N steps, stop; the same command with max_steps=2N resumes. The run dir at step N is also copied
    for the resized continuation."""
    run_dir = world["root"] / "resumed"
    first = train(world, run_dir, N)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{N:08d}"
    at_n = world["root"] / "resumed-at-n"
    shutil.copytree(run_dir, at_n)
    second = train(world, run_dir, 2 * N)
    return {"dir": run_dir, "at_n": at_n, "first": first, "second": second}


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_two_ranks_stay_bit_identical_and_match_one_process(world, straight):
    out = world["root"] / "ranks"
    out.mkdir()
    cmd = torchrun(2) + [str(world["helper"]), str(world["config"]), str(out), f"run.dir={out / 'run'}",
                         f"train.max_steps={N}"]
    proc = subprocess.run(cmd, cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rank0 = safetensors.torch.load_file(out / "rank0.safetensors")
    rank1 = safetensors.torch.load_file(out / "rank1.safetensors")
    assert_bitwise(rank0, rank1)

    # The same N steps on one process (the straight run's step-N checkpoint; the LR is constant): the 2-rank sum
    # of half-batch gradients equals the 1-rank full-batch gradient up to float summation order.
    one = load_checkpoint(str(step_dir(straight["dir"], N)))
    assert one.step == N
    assert rel_diff(rank0, one.weights) < 1e-5
    # ... and training moved the weights far more than that, so the comparison can tell a missing all-reduce.
    init = safetensors.torch.load_file(out / "init0.safetensors")
    assert_bitwise(init, safetensors.torch.load_file(out / "init1.safetensors"))
    moved = {k: float((one.weights[k] - init[k]).norm() / one.weights[k].norm()) for k in init}
    assert min(moved.values()) > 1e-3, moved


@pytest.mark.slow
def test_resume_is_bitwise_exact(straight, resumed):
    a = load_checkpoint(str(straight["dir"]))
    b = load_checkpoint(str(resumed["dir"]))
    assert a.step == b.step == 2 * N
    assert "resumed from" in resumed["second"].stdout and f"at step {N}" in resumed["second"].stdout
    assert_bitwise(a.weights, b.weights)
    assert_same_state(a.optimizer_state, b.optimizer_state)
    assert a.state == b.state  # data cursor, W&B run id
    assert a.state["cursor"]["next"] == 2 * N * BATCH

    la, lb = train_lines(straight["dir"]), train_lines(resumed["dir"])
    assert sorted(la) == sorted(lb) == list(range(1, 2 * N + 1))
    for step in range(N + 1, 2 * N + 1):  # every logged training value except timings, bitwise (JSON floats)
        same = {k: v for k, v in la[step].items() if not k.startswith("perf/")}
        assert {"train/loss", "train/mse", "train/kl", "train/grad_norm", "data/next_sample"} <= same.keys()
        assert {k: lb[step].get(k) for k in same} == same, f"step {step}"
    # The logged losses really change from step to step (so equality above is not of constants).
    assert len({la[s]["train/loss"] for s in la}) == len(la)


@pytest.mark.slow
def test_resume_on_two_processes_sees_the_same_samples(world, straight, resumed):
    run_dir = resumed["at_n"]
    proc = train(world, run_dir, 2 * N, nproc=2)
    assert f"at step {N}" in proc.stdout
    la, lc = train_lines(straight["dir"]), train_lines(run_dir)
    assert sorted(lc) == list(range(1, 2 * N + 1))
    assert [lc[s]["data/next_sample"] for s in sorted(lc)] == [la[s]["data/next_sample"] for s in sorted(la)]
    for s in range(N + 1, 2 * N + 1):  # same samples, same noise: losses agree up to float summation order
        assert math.isclose(lc[s]["train/loss"], la[s]["train/loss"], rel_tol=1e-5), s
    a, c = load_checkpoint(str(straight["dir"])), load_checkpoint(str(run_dir))
    assert c.step == 2 * N and c.state["cursor"] == a.state["cursor"]
    assert rel_diff(c.weights, a.weights) < 1e-5


@pytest.mark.slow
def test_finished_run_exits_0_and_a_rerun_trains_nothing(world, straight):
    assert straight["proc"].returncode == 0
    before = load_checkpoint(str(straight["dir"]))
    lines_before = train_lines(straight["dir"])
    folders_before = sorted(p.name for p in (straight["dir"] / "checkpoints").iterdir())
    again = run(world, ["train", str(world["config"]), f"run.dir={straight['dir']}", f"train.max_steps={2 * N}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {2 * N}" in again.stdout
    assert train_lines(straight["dir"]) == lines_before  # no step trained
    assert sorted(p.name for p in (straight["dir"] / "checkpoints").iterdir()) == folders_before
    after = load_checkpoint(str(straight["dir"]))
    assert after.step == 2 * N
    assert_bitwise(after.weights, before.weights)
    # Quick: setup and one held-out evaluation, no training (generous bound: a loaded 2-core machine).
    assert again.seconds < max(30.0, 1.5 * straight["proc"].seconds), again.seconds


@pytest.mark.slow
def test_lens_train_writes_complete_checkpoints(world, straight):
    run_dir = straight["dir"]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{2 * N:08d}"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [f"step-{N:08d}", f"step-{2 * N:08d}"]
    for step in (N, 2 * N):
        folder = step_dir(run_dir, step)
        parts = {f"__0_{t}.distcp" for t in range(WRITE_THREADS)}  # `straight` runs as one process
        assert {p.name for p in folder.iterdir()} == CKPT_FILES | parts
        state = json.loads((folder / "state.json").read_text())
        assert state == {"step": step, "cursor": {"next": step * BATCH}, "wandb_run_id": "tiny-lens"}
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["run"]["dir"] == str(run_dir) and saved["train"]["max_steps"] == 2 * N
        assert saved["model"]["layer"] == 1 and saved["data"]["seq_len"] == 16
    ckpt = load_checkpoint(str(run_dir))
    names = set(ckpt.weights)
    assert any(n.startswith("decoder.") for n in names) and any(n.startswith("encoder.") for n in names)
    assert all(t.dtype == torch.float32 for t in ckpt.weights.values())
    assert set(ckpt.rng) == {"python", "numpy", "torch", "cuda"}
    # The tracker's local record: one line per step (log_every=1) and the final held-out evaluation.
    rows = metrics(run_dir)
    assert [m["step"] for m in rows if "train/loss" in m] == list(range(1, 2 * N + 1))
    evals = [m for m in rows if "eval/variance_recovered" in m]
    assert evals and evals[-1]["step"] == 2 * N and math.isfinite(evals[-1]["eval/variance_recovered"])


@pytest.mark.slow
@pytest.mark.parametrize("notice", ["sigterm", "prestop-flag", "prestop-flag-no-time"])
def test_preemption_notice_checkpoints_at_a_step_boundary_and_exits_for_a_restart(world, tmp_path, notice):
    run_dir, flag = tmp_path / "run", tmp_path / "lens-preempt"
    flag.write_text("stale")  # left in /dev/shm by an earlier container of the pod: must not stop this one
    env = {**world["env"], "LENS_PREEMPT_FLAG": str(flag)}
    if notice == "prestop-flag-no-time":  # a grace budget no checkpoint fits in
        env["LENS_PREEMPT_GRACE_S"] = "0"
    cmd = [sys.executable, "-m", "lens", "train", str(world["config"]), f"run.dir={run_dir}", "train.max_steps=500",
           "train.checkpoint_every=1000"]
    proc = subprocess.Popen(cmd, cwd=world["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((run_dir / "metrics.jsonl").exists() and train_lines(run_dir)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    assert not flag.exists()  # the stale flag was cleared at start
    if notice == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:
        flag.write_text("now")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out[-2000:], err[-2000:])
    assert not flag.exists()  # consumed: a preStop hook waiting for the checkpoint returns
    if notice == "prestop-flag-no-time":
        assert "without one" in out and CheckpointManager(open_storage(str(run_dir))).load_latest() is None
        return
    step = max(train_lines(run_dir))
    assert 1 <= step < 500
    ckpt = load_checkpoint(str(run_dir))
    assert ckpt.step == step and ckpt.state["cursor"] == {"next": step * BATCH}  # nothing after the saved step
    # the restarted job resumes exactly there and finishes
    again = run(world, ["train", str(world["config"]), f"run.dir={run_dir}", f"train.max_steps={step + 1}",
                        "train.checkpoint_every=1000"])
    assert again.returncode == 0 and f"at step {step}" in again.stdout
    assert max(train_lines(run_dir)) == step + 1


@pytest.mark.slow
def test_two_ranks_train_trainable_bases(world, tmp_path):
    """With trainable decoder/encoder bases some parameters never get a gradient (the encoder's blocks past its
    read-out layer, its LM head); the ranks must still reduce the same gradients and save the same checkpoint."""
    run_dir = tmp_path / "bases"
    proc = run(world, ["train", str(world["config"]), f"run.dir={run_dir}", "train.max_steps=2",
                       "train.checkpoint_every=2", "decoder.train_base=true", "encoder.train_base=true"], nproc=2)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ckpt = load_checkpoint(str(run_dir))
    assert ckpt.step == 2 and any(name.startswith("encoder.lm.") for name in ckpt.weights)
