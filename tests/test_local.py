"""`scripts/launch.py CONFIG --local`: the rendered chart run on this machine, end to end on CPU with a tiny Llama.

Two torchrun agents (the chart's Worker replicas) rendezvous on 127.0.0.1 and form one world of 2; with
`data.on_the_fly=false` the dump Job's 2 indexes start with them, as on a cluster, and training waits for their
token store and shards, then reads them. A bad
config exits 2 naming the key before anything starts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _chart_tools import ROOT, helm_env  # noqa: F401
from conftest import tiny_run_config

LAUNCH = ROOT / "scripts" / "launch.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_files, helm_env):  # noqa: F811
    root = tmp_path_factory.mktemp("local")
    cfg = tiny_run_config(tiny_files, "tiny-local", root / "unused",
                          data={"max_sequences": 60, "shard_size": 8, "dump_batch_size": 4})
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    values = root / "local-values.yaml"  # the dump Job's shape, as a user's values file would set it
    values.write_text(yaml.safe_dump({"dump": {"completions": 2, "parallelism": 2}}))
    env = {**helm_env, "LENS_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "LOGLEVEL": "INFO"}  # torchrun agents then log their rendezvous (group_rank, group_world_size)
    return {"root": root, "config": config, "values": values, "env": env}


def launch_local(world, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(LAUNCH), str(world["config"]), "--local", *args],
                          cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - start
    return proc


def local_processes(workdir_prefix: str) -> list[int]:
    """Pids of live processes whose command line names a `--local` work dir (the rendered config's copy)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmdline = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if workdir_prefix.encode() in cmdline:
                pids.append(int(d.name))
    return pids


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def worker_world_sizes(out: str) -> dict[str, set[str]]:
    """group_world_size values each `[worker-r]` agent logged at rendezvous."""
    sizes: dict[str, set[str]] = {}
    for prefix, size in re.findall(r"^\[(worker-\d+)\] .*group_world_size=(\d+)", out, re.M):
        sizes.setdefault(prefix, set()).add(size)
    return sizes


def assert_trained(proc, run_dir: Path, steps: int) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    assert (step_dir(run_dir, steps) / "COMMITTED").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{steps:08d}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in rows if "train/loss" in m) == list(range(1, steps + 1))
    # Two agents, each with one process, formed one world of 2 nodes.
    assert worker_world_sizes(proc.stdout) == {"worker-0": {"2"}, "worker-1": {"2"}}, proc.stdout[-4000:]
    assert "[worker-0] lens torchrun --no-python lens train " in proc.stdout  # the chart's command, as rendered


@pytest.mark.slow
def test_local_trains_with_two_workers(world):
    run_dir = world["root"] / "on-the-fly"
    proc = launch_local(world, f"run.dir={run_dir}", "train.max_steps=2")
    print(f"on-the-fly local run: {proc.seconds:.1f} s")
    assert "[dump-" not in proc.stdout  # data.on_the_fly: the chart renders no dump Job
    assert_trained(proc, run_dir, 2)


@pytest.mark.slow
def test_local_starts_the_dump_job_and_the_trainer_together(world):
    run_dir, acts = world["root"] / "from-shards", world["root"] / "acts"
    proc = launch_local(world, "-f", str(world["values"]), f"run.dir={run_dir}", "train.max_steps=2",
                        "data.on_the_fly=false", f"data.activations={acts}")
    print(f"dump + train local run: {proc.seconds:.1f} s")
    out = proc.stdout
    assert "[dump-0] lens dump " in out and "[dump-1] lens dump " in out
    assert "[dump-2]" not in out
    # started together: the agents start before either dump index has ended, and training reads the finished dump
    started = re.search(r"\[worker-0\] .*torchrun --no-python lens train ", out)
    assert started and started.start() < min(out.rindex("[dump-0]"), out.rindex("[dump-1]")), out[-4000:]
    assert any(p.is_file() for p in acts.rglob("*")), "the dump wrote no shards"
    assert_trained(proc, run_dir, 2)


def test_bad_config_exits_2_before_starting_anything(world):
    run_dir = world["root"] / "bad"
    proc = launch_local(world, f"run.dir={run_dir}", "train.max_stepz=2", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.max_stepz" in proc.stderr
    assert "[worker-" not in proc.stdout and "[dump-" not in proc.stdout
    assert not run_dir.exists()


def test_workers_flag_needs_local(world):
    proc = subprocess.run([sys.executable, str(LAUNCH), str(world["config"]), "--workers", "3", "--dry-run"],
                          cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--workers is for --local" in proc.stderr


@pytest.mark.slow
def test_sigterm_stops_every_local_process(world):
    """SIGTERM (or Ctrl-C) to the launcher reaches the agents, which stop their workers; nothing is left behind."""
    run_dir = world["root"] / "stopped"
    proc = subprocess.Popen([sys.executable, str(LAUNCH), str(world["config"]), "--local", f"run.dir={run_dir}",
                             "train.max_steps=100000", "train.checkpoint_every=100000"],
                            cwd=world["root"], env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    try:
        for line in proc.stdout:  # wait until training runs
            lines.append(line)
            if re.match(r"\[worker-\d\] .*step 2/", line):
                break
        assert proc.poll() is None, "".join(lines[-50:])
        assert len(local_processes("lens-local-tiny-local-")) >= 4  # 2 agents + 2 trainers
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, "".join(lines[-30:]) + out[-3000:] + err[-2000:]
    deadline = time.time() + 10
    while local_processes("lens-local-tiny-local-") and time.time() < deadline:
        time.sleep(0.2)
    assert local_processes("lens-local-tiny-local-") == []


@pytest.mark.slow
def test_dump_exit_2_fails_the_run_before_training(world):
    """Bad input found by the dump itself (here: a layer the model does not have) is not retried (the Job's
    podFailurePolicy), and the run stops before any training step."""
    run_dir, acts = world["root"] / "bad-dump", world["root"] / "bad-acts"
    proc = launch_local(world, "-f", str(world["values"]), f"run.dir={run_dir}", "model.layer=7",
                        "data.on_the_fly=false", f"data.activations={acts}", timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "model.layer" in proc.stdout
    assert "not retried" in proc.stdout and "retrying" not in proc.stdout
    assert not re.search(r"\[worker-\d\] .*step \d+/", proc.stdout)


def test_local_pods_use_this_machines_caches_not_the_cache_volume(world, tmp_path):
    """The chart points HF_HOME, LENS_CACHE, W&B's dirs... at the pod's cache volume; a local pod leaves them to this
    shell (so a converted model or a token cache is reused), while the other mounts still become local folders."""
    from lens.config import load_config
    from lens.launch import local_manifests
    from lens.launch.local import _Pod

    docs = local_manifests(load_config(world["config"]), {})
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    rendered = {e["name"] for e in spec["containers"][0]["env"]}
    assert {"HF_HOME", "LENS_CACHE", "LENS_SCRATCH", "WANDB_DIR"} <= rendered
    pod = _Pod(spec, None, {}, tmp_path, "worker-0")
    assert not {"HF_HOME", "LENS_CACHE", "LENS_SCRATCH", "WANDB_DIR", "XDG_CACHE_HOME"} & set(pod.env)
    assert pod.env["LENS_PREEMPT_FLAG"].startswith(str(tmp_path))  # /dev/shm/... became this pod's folder


def _dump_docs(command: list[str]) -> list[dict]:
    """Rendered manifests reduced to what `run_local` reads: a PyTorchJob (its workers are faked) and a dump Job of
    2 indexes running `command`."""
    pod = {"containers": [{"name": "dump", "command": command}]}
    return [{"kind": "PyTorchJob", "metadata": {"name": "fake"}, "spec": {}},
            {"kind": "Job", "spec": {"completions": 2, "parallelism": 2, "backoffLimit": 6, "template": {"spec": pod}}}]


class _FakeWorkers:
    """Training that polls the dump Job's `failed` as `WorkerGroup.run` does, then exits `code` after `seconds`."""

    def __init__(self, code: int, seconds: float):
        self.code, self.seconds = code, seconds

    def run(self, failed) -> int:
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if code := failed():
                return code
            time.sleep(0.05)
        return self.code


def test_failed_training_stops_the_dump_pods_without_restarting_them(monkeypatch, capfd):
    from lens.launch import local

    runners = []
    monkeypatch.setattr(local.LocalRun, "workers", lambda self: runners.append(self.runner) or _FakeWorkers(1, 1.0))
    assert local.run_local(_dump_docs(["sleep", "60"])) == 1
    time.sleep(0.5)  # more than a poll of the dump loop: a pod it restarted after the stop would show up now
    procs = runners[0].procs
    assert len(procs) == 2 and all(p.poll() is not None for p in procs)  # both stopped, neither started again
    assert "retrying" not in capfd.readouterr().out


def test_an_error_starting_a_dump_pod_reaches_the_caller(monkeypatch):
    from lens.errors import InputError
    from lens.launch import local

    monkeypatch.setattr(local.LocalRun, "workers", lambda self: _FakeWorkers(0, 10.0))
    with pytest.raises(InputError, match="no-such-dump-command not found on PATH"):
        local.run_local(_dump_docs(["no-such-dump-command"]))
