"""Failure discipline, as a table: every bad input or fault gets its exit code (0 recovered, 2 bad input, 128 and
above retryable), an exit 2 says so in at most one stderr line before any work, and nothing saved before changes
(sha256 of every file of run.dir and of the dump, before and after).

The cases run the real command in-process (`lens.cli.main`) on one trained tiny run and one tiny dump, copied per
case; the cases whose point is a process boundary (torchrun, signals, the local emulation of the PyTorchJob, a hub
read at import time) run real subprocesses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from _chart_tools import helm_env  # noqa: F401
from conftest import tiny_run_config
from lens.cli import main
from lens.errors import EXIT_INPUT, is_retryable

ROOT = Path(__file__).resolve().parents[1]
RETRY = "retryable"
DUMP_DATA = {"max_sequences": 60, "shard_size": 16, "dump_batch_size": 8}  # the tiny dump's; a run reads it with them
TRAINED = {"max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "eval_samples": 12}  # as conftest's trained_run


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (relative path -> hex); {} when it does not exist."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def newest_checkpoint(run: Path) -> Path:
    return sorted(p for p in (run / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("step-"))[-1]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garble(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what this file should hold\xfe" * 4)


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory, tiny_files) -> Path:
    """A finished tiny dump (`lens dump`): copied, never written, by the cases."""
    root = tmp_path_factory.mktemp("failures-dump")
    cfg = tiny_run_config(tiny_files, "failures-dump", root / "unused",
                          data={"on_the_fly": False, "activations": str(root / "dump"), **DUMP_DATA})
    (root / "dump.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["dump", str(root / "dump.yaml")]) == 0
    _restore_logging()
    return root / "dump"


@dataclass
class Work:
    """One case's copies: a trained run, a dump, a valid config over both, and a scratch folder."""

    root: Path
    run: Path
    dump: Path
    config: Path
    tiny: dict
    cfg: dict = field(default_factory=dict)

    def write_config(self, path: Path | None = None, **sections) -> Path:
        cfg = yaml.safe_load(yaml.safe_dump(self.cfg))
        for name, values in sections.items():
            cfg[name].update(values)
        path = path or self.config
        path.write_text(yaml.safe_dump(cfg))
        return path


@pytest.fixture
def work(tmp_path, trained_run, dump_dir, tiny_files, monkeypatch) -> Work:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    shutil.copytree(trained_run, tmp_path / "run")
    shutil.copytree(dump_dir, tmp_path / "dump")
    w = Work(tmp_path, tmp_path / "run", tmp_path / "dump", tmp_path / "cfg.yaml", tiny_files)
    w.cfg = tiny_run_config(tiny_files, "trained-tiny", w.run, train=TRAINED)
    w.write_config()
    yield w
    _restore_logging()
    from lens.train import dist

    dist.shutdown()


def _restore_logging() -> None:
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    root.setLevel(logging.WARNING)


@dataclass
class Case:
    id: str
    argv: Callable[[Work], list[str]]
    expect: int | str  # 0, 2 or RETRY
    setup: Callable[[Work], None] = lambda w: None
    must_say: str = ""  # a word the stderr line (exit 2) or the output (exit 0) must hold
    marks: tuple = ()


def train(w: Work, *overrides: str) -> list[str]:
    return ["train", str(w.config), *overrides]


def train_fresh(w: Work, *overrides: str) -> list[str]:
    """Train into a run dir that does not exist yet (the case checks it is not created)."""
    return ["train", str(w.config), f"run.dir={w.root / 'fresh'}", *overrides]


def from_dump(w: Work, *overrides: str) -> list[str]:
    return train_fresh(w, "data.on_the_fly=false", f"data.activations={w.dump}",
                       *(f"data.{key}={value}" for key, value in DUMP_DATA.items()), *overrides)


def damage_newest(name: str, how: Callable[[Path], None]) -> Callable[[Work], None]:
    """Damage the file of the newest checkpoint whose name starts with `name` (whatever the layout's suffixes)."""
    def setup(w: Work) -> None:
        files = [p for p in newest_checkpoint(w.run).rglob("*") if p.is_file() and p.name.startswith(name)]
        assert files, f"no {name}* in {newest_checkpoint(w.run)}"
        for p in files:
            how(p)
    return setup


def damage_shard(how: Callable[[Path], None]) -> Callable[[Work], None]:
    def setup(w: Work) -> None:
        shards = sorted(p for p in w.dump.rglob("*.safetensors"))
        assert shards, f"no shards in {w.dump}"
        how(shards[0])
    return setup


def write(name: str, data: bytes | str) -> Callable[[Work], None]:
    def setup(w: Work) -> None:
        (w.root / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def damaged_model(how: Callable[[Path], None], filename: str) -> Callable[[Work], None]:
    def setup(w: Work) -> None:
        shutil.copytree(w.tiny["model_dir"], w.root / "model")
        how(w.root / "model" / filename)
    return setup


CASES = [
    # --- config files and values: exit 2 before anything is loaded
    Case("yaml-syntax", lambda w: ["train", "bad.yaml"], 2, write("bad.yaml", "train:\n  max_steps: [1\n"), "line"),
    Case("yaml-not-a-mapping", lambda w: ["train", "list.yaml"], 2, write("list.yaml", "- run\n- train\n"),
         "mapping"),
    Case("yaml-section-scalar", lambda w: ["train", "s.yaml"], 2, write("s.yaml", "train: 5\n"),
         "train=5"),  # the key and value, not the `lens train:` prefix
    Case("yaml-not-utf8", lambda w: ["train", "bin.yaml"], 2, write("bin.yaml", b"\xff\xfe\x00run"), "UTF-8"),
    Case("config-missing", lambda w: ["train", "nowhere.yaml"], 2, must_say="CONFIG"),
    Case("unknown-key", lambda w: train(w, "bad.key=1"), 2, must_say="bad"),
    Case("unknown-nested-key", lambda w: train(w, "train.max_stepz=1"), 2, must_say="train.max_stepz"),
    Case("wrong-type", lambda w: train(w, "train.max_steps=abc"), 2, must_say="train.max_steps"),
    Case("out-of-range", lambda w: train(w, "train.batch_size=0"), 2, must_say="train.batch_size"),
    Case("delete-override", lambda w: train(w, "~train.max_steps"), 2, must_say="train.max_steps"),
    Case("override-syntax", lambda w: train(w, "train.max_steps=[1"), 2, must_say="overrides"),
    Case("url-credentials-endpoint", lambda w: train(w, "storage.endpoint_url=http://ak:s3cr3t@127.0.0.1:9"), 2,
         must_say="storage.endpoint_url"),
    Case("url-credentials-run-dir", lambda w: train(w, "run.dir=s3://ak:s3cr3t@bucket/run"), 2,
         must_say="run.dir"),
    Case("layer-out-of-range", lambda w: train(w, "model.layer=99"), 2, must_say="model.layer"),
    Case("checkpoint-of-another-lens", lambda w: train(w, "decoder.prompt=<bos>Other <embed>:"), 2,
         must_say="decoder.prompt"),
    # --- model, corpus, dump
    Case("model-missing", lambda w: train(w, f"model.name={w.root / 'no-model'}"), 2, must_say="model.name"),
    Case("model-weights-truncated", lambda w: train(w, f"model.name={w.root / 'model'}"), 2,
         damaged_model(truncate, "model.safetensors"), "model.name"),
    Case("model-weights-garbage", lambda w: train(w, f"model.name={w.root / 'model'}"), 2,
         damaged_model(garble, "model.safetensors"), "model.name"),
    Case("model-config-garbage", lambda w: train(w, f"model.name={w.root / 'model'}"), 2,
         damaged_model(garble, "config.json"), "model.name"),
    Case("corpus-missing", lambda w: train_fresh(w, f"data.corpus={w.root / 'no-corpus.txt'}"), 2,
         must_say="data.corpus"),
    Case("corpus-undecodable", lambda w: train_fresh(w, f"data.corpus={w.root / 'corpus'}"), 2,
         lambda w: (w.root / "corpus").mkdir() or (w.root / "corpus" / "a.txt").write_bytes(
             b"good text line\n" * 40 + b"\xff\xfe\xfa broken\n"), "corpus"),
    Case("shard-truncated", lambda w: from_dump(w), 2, damage_shard(truncate), "activation shard"),
    Case("dump-manifest-garbage", lambda w: from_dump(w), 2,
         lambda w: garble(w.dump / "manifest.json"), "manifest"),  # the activations' own (tokens/ has another)
    Case("dump-not-there-yet", lambda w: from_dump(w, f"data.activations={w.root / 'none'}", "data.wait_timeout=0"),
         RETRY),  # its dump Job may still be writing it: waited for, then retried
    # --- checkpoints: a damaged newest one is skipped, the older committed one is used; nothing is deleted
    Case("ckpt-tensors-truncated-eval", lambda w: ["eval", str(w.run), "--samples", "4", "--no-wandb"], 0,
         damage_newest("__", truncate), "step 3"),
    Case("ckpt-committed-garbage-eval", lambda w: ["eval", str(w.run), "--samples", "4", "--no-wandb"], 0,
         damage_newest("COMMITTED", garble), "step 3"),
    Case("ckpt-config-garbage-eval", lambda w: ["eval", str(w.run), "--samples", "4", "--no-wandb"], 0,
         damage_newest("config", garble), "step 3"),
    Case("ckpt-shard-truncated-train", lambda w: train(w), 0, damage_newest("__", truncate)),
    Case("ckpt-metadata-garbage-train", lambda w: train(w), 0, damage_newest(".metadata", garble)),
    Case("ckpt-rng-truncated-train", lambda w: train(w), 0, damage_newest("rng", truncate)),
    # --- arguments and output paths of eval / explain: exit 2 before the lens loads
    Case("eval-samples-zero", lambda w: ["eval", str(w.run), "--samples", "0", "--no-wandb"], 2,
         must_say="--samples"),
    Case("eval-json-folder-missing", lambda w: ["eval", str(w.run), "--json", "no/such/m.json", "--no-wandb"], 2,
         must_say="--json"),
    Case("eval-json-is-a-folder", lambda w: ["eval", str(w.run), "--json", str(w.root), "--no-wandb"], 2,
         must_say="--json"),
    Case("eval-json-read-only", lambda w: ["eval", str(w.run), "--json", "/proc/lens-metrics.json", "--no-wandb"],
         2, must_say="--json"),
    Case("eval-run-missing", lambda w: ["eval", str(w.root / "no-run"), "--no-wandb"], 2, must_say="neither a run directory"),
    Case("explain-html-folder-missing", lambda w: ["explain", str(w.run), "Paris is big.", "--html", "no/x.html"], 2,
         must_say="--html"),
    Case("explain-best-of-zero", lambda w: ["explain", str(w.run), "Paris is big.", "--best-of", "0"], 2,
         must_say="--best-of"),
    Case("explain-empty-text", lambda w: ["explain", str(w.run), "  "], 2, must_say="text"),
    Case("bad-argument", lambda w: ["eval", str(w.run), "--samples", "many"], 2, must_say="--samples"),
    # --- run.dir that can never be written: exit 2 before the model loads
    Case("run-dir-under-a-file", lambda w: train(w, f"run.dir={w.config}/run"), 2, must_say="run"),
    Case("run-dir-read-only", lambda w: train(w, "run.dir=/proc/lens-run"), 2, must_say="/proc/lens-run"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_failure_table(case: Case, work: Work, capfd):
    case.setup(work)
    before = {"run": digest(work.run), "dump": digest(work.dump)}
    capfd.readouterr()
    try:
        code = main(case.argv(work))
    except SystemExit as e:  # argparse's usage error
        code = e.code
    out, err = capfd.readouterr()
    # argparse's usage (its first line and continuation lines) comes before its one error line
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    if case.expect == RETRY:
        assert is_retryable(code), (code, err[-3000:])
    else:
        assert code == case.expect, (code, out[-3000:], err[-3000:])
    if code == EXIT_INPUT:
        assert len(lines) == 1, err
        assert case.must_say in lines[-1], lines
        assert "s3cr3t" not in err  # a credential is never echoed
    elif case.must_say:
        assert case.must_say in out + err, (out[-3000:], err[-3000:])
    assert {"run": digest(work.run), "dump": digest(work.dump)} == before or case.expect == 0 and code == 0 \
        and _only_added(before["run"], digest(work.run)), "files saved before were changed"
    assert not (work.root / "fresh").exists() or code == 0, "a failed start created its run dir"


def _only_added(before: dict, after: dict) -> bool:
    """A run that recovered may add checkpoints; every file it had (the damaged ones included) is unchanged, in its
    place or, for a checkpoint the resume could not load, moved aside whole under `checkpoints/unloadable/`. The
    logs (metrics.jsonl, events.jsonl, the W&B folder) grow by the steps trained again."""
    def kept(path: str, sha: str) -> bool:
        if path.endswith(".jsonl") or path.startswith("wandb/"):
            return True
        aside = path.replace("checkpoints/", "checkpoints/unloadable/", 1)
        return after.get(path) == sha or after.get(aside) == sha
    return all(kept(k, v) for k, v in before.items())


def test_rerun_of_dump_rewrites_a_corrupt_shard(work: Work, capfd):
    """The remedy a corrupt shard's error prints ("rerun lens dump") works: the rerun verifies, rewrites it, exit 0."""
    pristine = digest(work.dump)
    damage_shard(truncate)(work)
    dump_cfg = work.write_config(work.root / "dump.yaml", data={"on_the_fly": False, "activations": str(work.dump),
                                                               "max_sequences": 60, "shard_size": 16,
                                                               "dump_batch_size": 8})
    assert main(["dump", str(dump_cfg)]) == 0
    assert digest(work.dump) == pristine


def test_s3_bucket_missing_wrong_credentials_and_unreachable(work: Work, capfd, monkeypatch):
    """A missing bucket and refused credentials are bad input (exit 2, one line, before the model loads); an
    endpoint that does not answer is retried with backoff, then exits retryable."""
    from moto import settings
    from moto.server import ThreadedMotoServer

    import lens.storage

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION":
                        "us-east-1", "AWS_CONFIG_FILE": str(work.root / "none"), "AWS_SHARED_CREDENTIALS_FILE":
                        str(work.root / "none"), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        capfd.readouterr()
        assert main(train(work, "run.dir=s3://no-such-bucket/run", f"storage.endpoint_url={endpoint}")) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no-such-bucket" in err[0] and "does not exist" in err[0], err

        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lens-auth")
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks credentials
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        capfd.readouterr()
        assert main(train(work, "run.dir=s3://lens-auth/run", f"storage.endpoint_url={endpoint}")) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "credentials" in err[0], err
    finally:
        server.stop()
    # Nothing listens on the stopped server's port: connection refused, retried (shortened here), then retryable.
    monkeypatch.setattr(lens.storage, "S3_ATTEMPTS", 2)
    monkeypatch.setattr(lens.storage, "BOTO_ATTEMPTS", 1)
    monkeypatch.setattr(lens.storage, "S3_BACKOFF", (0.1, 0.1))
    code = main(train(work, "run.dir=s3://lens-auth/run", f"storage.endpoint_url={endpoint}"))
    assert is_retryable(code), code


# --- process boundaries: torchrun, signals, the local emulation, the hub ----------------------------------------------

def _env(work: Work, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "LENS_CACHE": str(work.root / "cache"), **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's lens, torchrun
    return env


@pytest.mark.slow
def test_torchrun_keeps_exit_2(work: Work):
    """`lens torchrun` (the chart's command): a bad key exits 2 with one line before any worker starts (torchrun
    alone would exit 1). A worker's own exit 2 (a damaged weights file) is the local emulation's case below."""
    before = digest(work.run)
    proc = subprocess.run([sys.executable, "-m", "lens", "torchrun", "--nproc-per-node", "2", "--no-python", "lens",
                           "train", str(work.config), "bad.key=1"], cwd=work.root, env=_env(work, LOGLEVEL="INFO"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, (proc.stdout[-3000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad" in lines[0], lines
    # torchrun logs this at INFO (LOGLEVEL) when it launches; no worker was started
    assert "Starting elastic_operator" not in proc.stdout + proc.stderr
    assert digest(work.run) == before


@pytest.mark.slow
def test_local_emulation_does_not_restart_a_pod_that_exited_2(work: Work, helm_env):  # noqa: F811
    """The rendered PyTorchJob (`restartPolicy: ExitCode`, `lens torchrun` agents allowed torchrun restarts) run
    here: the workers exit 2 on a damaged weights file, their agents stop at once with exit 2 instead of restarting
    them, no pod is restarted, and the launcher exits 2."""
    damaged_model(truncate, "model.safetensors")(work)
    cfg = work.write_config(work.root / "local.yaml", model={"name": str(work.root / "model"), "layer": 1})
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch.py"), str(cfg), "--local"], cwd=work.root,
                          env={**_env(work, LOGLEVEL="INFO"), **helm_env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2, (proc.stdout[-4000:], proc.stderr[-3000:])
    assert "does not restart it" in proc.stdout + proc.stderr, proc.stdout[-4000:]
    assert "restarting the pod" not in proc.stdout + proc.stderr
    # nor did torchrun restart its workers: its agent logs this at INFO (LOGLEVEL) before each worker-group restart
    assert "will restart worker group" not in proc.stdout + proc.stderr



_AGENT = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    got = []
    signal.signal(signal.SIGTERM, lambda *_: got.append(1))
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    agent = os.getpid() if sys.argv[1] == "parent" else stranger.pid
    child = "from lens.agent import stop_agent; stop_agent()"
    subprocess.run([sys.executable, "-c", child], env={**os.environ, "LENS_AGENT_PID": str(agent)}, check=True)
    time.sleep(0.2)
    print(f"agent signalled={bool(got)} stranger alive={stranger.poll() is None}")
    stranger.kill()
""")


@pytest.mark.parametrize("agent", ["parent", "stranger"])
def test_a_worker_stops_only_its_own_agent(agent):
    """`stop_agent` SIGTERMs the process named by LENS_AGENT_PID only while it is the worker's parent: a worker
    orphaned by its agent (the pid may then be any process's) signals nothing."""
    out = subprocess.run([sys.executable, "-c", _AGENT, agent], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    expected = "agent signalled=True stranger alive=True" if agent == "parent" else \
        "agent signalled=False stranger alive=True"
    assert out.stdout.strip() == expected

def _train_until_step(work: Work, signals: int) -> tuple[subprocess.Popen, str]:
    """Train, and at the first logged step send SIGINT; with `signals=2` a second one once the first is seen (a
    step takes 16 micro-batches, so it lands mid-step, before the save)."""
    cfg = work.write_config(work.root / "long.yaml", run={"name": "sigint", "dir": str(work.root / "sigint")},
                            train={"max_steps": 500, "batch_size": 32, "checkpoint_every": 400, "log_every": 1,
                                   "eval_every": 0})
    proc = subprocess.Popen([sys.executable, "-m", "lens", "train", str(cfg)], cwd=work.root, env=_env(work),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, sent = [], 0
    for line in proc.stdout:
        seen.append(line)
        if (" step 1/500 " in line and sent == 0) or ("SIGINT: saving" in line and sent < signals):
            proc.send_signal(signal.SIGINT)
            sent += 1
        if sent == signals:
            break
    out, err = proc.communicate(timeout=300)
    return proc, "".join(seen) + out + err


@pytest.mark.slow
def test_sigint_saves_like_sigterm_and_a_second_sigint_aborts(work: Work):
    proc, text = _train_until_step(work, signals=1)
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "Traceback" not in text and "committed" in text, text[-3000:]
    step = newest_checkpoint(work.root / "sigint")
    assert (step / "COMMITTED").exists() and step.name != "step-00000000", step  # saved where it stopped

    shutil.rmtree(work.root / "sigint")
    proc, text = _train_until_step(work, signals=2)
    assert proc.returncode == 128 + signal.SIGINT, text[-3000:]
    assert "interrupted" in text and "committed" not in text, text[-3000:]


@pytest.mark.slow
def test_unreachable_hub_is_retryable(work: Work):
    """The hub cannot be reached (nothing listens at HF_ENDPOINT; huggingface_hub retries with backoff): exit
    retryable in one line, not 2 (offline, a model missing from the cache is 2: tests/test_hub.py)."""
    env = _env(work, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(work.root / "hf"))
    proc = subprocess.run([sys.executable, "-m", "lens", "train", str(work.config), "model.name=some-org/some-model"],
                          cwd=work.root, env=env, capture_output=True, text=True, timeout=300)
    assert is_retryable(proc.returncode), (proc.returncode, proc.stderr[-3000:])
    assert "unreachable" in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


_EXIT_WITH_A_GLOO_WORKER_BUSY = textwrap.dedent("""
    # A process group's last collective completes in a gloo worker thread while the main thread holds the GIL, the
    # group stays referenced after destroy_process_group (as FSDP's and DTensor's caches hold it), and the process
    # exits 2: the worker frees the collective's tensors, which needs the GIL, only once the main thread is exiting.
    import sys, time, torch, torch.distributed as dist
    from lens.train import dist as lens_dist

    lens_dist.init()
    group = dist.group.WORLD
    sys.setswitchinterval(1000.0)  # the main thread keeps the GIL until it blocks
    dist.all_gather([torch.empty(1000)], torch.ones(1000), async_op=True)
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # the collective completes meanwhile; its worker waits for the GIL
        pass
    dist.destroy_process_group()
    if sys.argv[1] == "exit_process":
        lens_dist.exit_process(2)
    sys.exit(2)
""")


@pytest.mark.slow
@pytest.mark.parametrize("leave", ["exit_process", "sys.exit"])
def test_a_rank_keeps_its_exit_code_with_a_gloo_worker_still_busy(tmp_path, leave):
    """What a rank exits with (0, 2, a preemption's 128 + n) is what torchrun and the operator act on. Python's own
    exit races gloo's worker threads: CPython ends a thread that wants the GIL during finalization with a forced
    unwind, through a destructor that may not throw, and the process aborts (SIGABRT). `exit_process` leaves before
    finalization. The `sys.exit` case is the control that shows this test reaches the race: should it exit 2, the
    pinned torch no longer aborts there and `exit_process` could become a plain exit."""
    script = tmp_path / "busy.py"
    script.write_text(_EXIT_WITH_A_GLOO_WORKER_BUSY)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), leave], env=env, capture_output=True, text=True, timeout=120)
    if leave == "exit_process":
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    else:
        assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stderr[-3000:])
        assert "terminate called without an active exception" in proc.stderr, proc.stderr[-3000:]


_LENS_COMMAND = textwrap.dedent("""
    import atexit, sys
    from lens.cli import run

    class Finalized:
        def __del__(self):
            print("interpreter finalized", flush=True)

    keep = Finalized()  # a module global: its __del__ runs only in the interpreter's finalization
    atexit.register(print, "atexit handlers ran")
    sys.argv = ["lens", *sys.argv[1:]]
    run()
""")


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_lens_command_leaves_through_exit_process_after_training_code(tmp_path, command):
    """The `lens` command (lens.cli.run) exits without the interpreter's finalization once the command imported
    the training code (`lens train`, even one that stops at a bad config, may have run a process group), with its
    exit code, its atexit handlers run and its output flushed; other commands (`lens eval`) exit as Python does."""
    script = tmp_path / "command.py"
    script.write_text(_LENS_COMMAND)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), command, str(tmp_path / "missing")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing" in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    assert "atexit handlers ran" in proc.stdout, proc.stdout
    assert ("interpreter finalized" in proc.stdout) == (command == "eval"), proc.stdout
