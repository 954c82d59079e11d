"""Checkpoints and the storage layer under them: round trips, garbage collection, kill -9 mid-save, S3 on loopback."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import boto3
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from lens.errors import InputError
from lens.storage import LocalStorage, S3Storage, Storage, open_storage
from lens.train.checkpoint import (
    CheckpointManager,
    load_checkpoint,
    rng_state,
    set_rng_state,
    step_dirname,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PART = "tensors-00000-of-00001.safetensors"
FILES = ["COMMITTED", "config.yaml", "optimizer.pt", "rng.pt", "state.json", PART]


# ---------------------------------------------------------------------------------------------------------------------
# Fixtures: a real S3 server on loopback, and one storage per backend.


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Dummy credentials, and nothing read from the user's AWS files or instance metadata."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3_bucket(s3_endpoint, s3_env):
    name = f"lens-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}/some/prefix", endpoint_url=request.getfixturevalue("s3_endpoint"))


# ---------------------------------------------------------------------------------------------------------------------
# Storage: one contract, two backends.


def test_open_storage_picks_the_backend(tmp_path, s3_env):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(f"file://{tmp_path}/run").uri("a/b") == f"{tmp_path}/run/a/b"
    s3 = open_storage("s3://bucket/runs/x/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Storage) and s3.uri("a/b") == "s3://bucket/runs/x/a/b" and s3.uri() == "s3://bucket/runs/x"
    with pytest.raises(InputError, match="unsupported scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(InputError, match="no bucket"):
        open_storage("s3:///x")


def test_storage_bytes_round_trip_and_missing_key(storage):
    storage.write_bytes("a/b/c.bin", b"one")
    storage.write_bytes("a/b/c.bin", b"two")  # replaces
    assert storage.read_bytes("a/b/c.bin") == b"two"
    assert storage.exists("a/b/c.bin") and not storage.exists("a/b") and not storage.exists("a/b/missing")
    with pytest.raises(FileNotFoundError, match=re.escape(storage.uri("a/b/missing"))):
        storage.read_bytes("a/b/missing")
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.read_file("missing", "/tmp/never-written")
    for bad in ["../x", "a/../b", "a//b", "./a"]:
        with pytest.raises(ValueError, match="invalid"):
            storage.write_bytes(bad, b"")


def test_storage_list_is_by_folder_and_sorted(storage):
    for key in ["ab/x", "a/y", "a/z/1", "a/z/0", "top"]:
        storage.write_bytes(key, key.encode())
    assert storage.list("a") == ["a/y", "a/z/0", "a/z/1"]  # a folder prefix: "ab/x" is not under "a"
    assert storage.list("a/") == storage.list("a")
    assert storage.list() == ["a/y", "a/z/0", "a/z/1", "ab/x", "top"]
    assert storage.list("nothing") == []
    assert storage.list_dirs() == ["a", "ab"]
    assert storage.list_dirs("a") == ["z"]
    assert storage.sub("a").list() == ["y", "z/0", "z/1"]
    assert storage.sub("a").uri("y") == storage.uri("a/y")


def test_storage_delete_leaves_no_empty_folders(storage):
    for key in ["d/1", "d/e/2", "d/e/3", "f/4"]:
        storage.write_bytes(key, b"x")
    storage.delete("f/4")
    storage.delete("f/4")  # already gone: fine
    assert storage.list_dirs() == ["d"]
    storage.delete_prefix("d/e")
    assert storage.list() == ["d/1"] and storage.list_dirs("d") == []
    storage.delete_prefix("d")
    storage.delete_prefix("never-there")
    assert storage.list() == [] and storage.list_dirs() == []
    with pytest.raises(ValueError, match="empty"):
        storage.delete_prefix("")


def test_storage_file_round_trip(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20))
    storage.write_file("big/obj", src)
    storage.read_file("big/obj", tmp_path / "out" / "dst.bin")
    assert (tmp_path / "out" / "dst.bin").read_bytes() == src.read_bytes()
    assert os.listdir(tmp_path / "out") == ["dst.bin"]  # no temp file left beside it


def test_local_storage_hides_a_killed_writers_temp_file(tmp_path):
    storage = open_storage(str(tmp_path))
    storage.write_bytes("d/obj", b"x")
    (tmp_path / "d" / ".obj.k3j_x9q2.tmp").write_bytes(b"half")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".w.abcdefgh.tmp").write_bytes(b"half")
    assert storage.list() == ["d/obj"]
    assert storage.list_dirs() == ["d"]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints.


def _trained_adamw(seed: int = 0) -> tuple[nn.Linear, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 5)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Values a lossy round trip would change: NaN payloads, -0.0, denormals, infinities.
    weights["odd"] = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), -float("inf"), 1 / 3])
    return weights


def _assert_bitwise_equal(a: object, b: object, where: str = "") -> None:
    """Recursive equality where tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _draws() -> tuple:
    """A few draws from every global generator a training step uses."""
    return (
        torch.rand(4).tolist(),
        torch.randn(2).tolist(),
        random.random(),
        np.random.rand(3).tolist(),
        np.random.randn(),
    )


def _save(manager: CheckpointManager, step: int, scale: float = 1.0) -> str:
    weights = {"w": torch.full((3,), float(step) * scale)}
    return manager.save(step, weights, {"state": {}, "param_groups": []}, {"cursor": step}, f"step: {step}\n")


def test_round_trip_is_bitwise(tmp_path):
    model, optimizer = _trained_adamw()
    weights = _weights(model)
    state = {"cursor": {"epoch": 1, "index": 1234}, "scheduler": {"last_epoch": 3}, "wandb_run_id": "abc123"}
    manager = CheckpointManager(open_storage(str(tmp_path / "run")))

    name = manager.save(3, weights, optimizer.state_dict(), state, "run:\n  name: test\n")
    after_save = _draws()
    _draws()  # move every generator on
    checkpoint = manager.load_latest()
    set_rng_state(checkpoint.rng)

    assert _draws() == after_save
    assert (checkpoint.step, checkpoint.name, checkpoint.state) == (3, name, state) and name == "step-00000003"
    assert checkpoint.config_yaml == "run:\n  name: test\n"
    assert checkpoint.uri == str(tmp_path / "run" / "checkpoints" / "step-00000003")
    _assert_bitwise_equal(weights, checkpoint.weights, "weights")
    _assert_bitwise_equal(optimizer.state_dict(), checkpoint.optimizer_state, "optimizer")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / name)) == FILES
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == name

    # The restored optimizer continues exactly as the original does.
    restored_model, restored = _trained_adamw(seed=1)
    with torch.no_grad():
        for name_, p in restored_model.named_parameters():
            p.copy_(checkpoint.weights[name_])
    restored.load_state_dict(checkpoint.optimizer_state)
    x = torch.randn(8, 5)
    for m, opt in [(model, optimizer), (restored_model, restored)]:
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    _assert_bitwise_equal(dict(model.named_parameters()), dict(restored_model.named_parameters()), "after a step")


def test_rng_state_includes_cached_gaussians():
    """numpy and python both cache the second value of a Box-Muller pair; it is part of the state."""
    np.random.seed(1)
    np.random.randn()  # leaves half a Box-Muller pair cached (has_gauss=1)
    random.seed(2)
    random.gauss(0, 1)  # python caches one gaussian too
    state = rng_state()
    expected = (_draws(), random.gauss(0, 1))
    set_rng_state(state)
    assert (_draws(), random.gauss(0, 1)) == expected


def test_state_may_not_hold_the_step(tmp_path):
    with pytest.raises(ValueError, match="'step'"):
        CheckpointManager(open_storage(str(tmp_path))).save(1, {}, {}, {"step": 1}, "")
    assert os.listdir(tmp_path) == []


def test_keep_newest_k_and_never_the_latest(tmp_path):
    storage = open_storage(str(tmp_path))
    manager = CheckpointManager(storage, keep=2)
    for step in [10, 20, 30, 40]:
        _save(manager, step)
    assert manager.committed() == ["step-00000030", "step-00000040"]
    assert storage.list_dirs("checkpoints") == ["step-00000030", "step-00000040"]

    # A late save of an older step (a generation that a restart overtook) moves nothing back and is collected.
    _save(manager, 5)
    assert manager.committed() == ["step-00000030", "step-00000040"]
    assert manager.load_latest().step == 40
    # A pointer a user set by hand to an older checkpoint is kept while it is the pointer...
    storage.write_bytes("checkpoints/latest", b"step-00000030")
    _save(manager, 30)
    assert manager.load_latest().step == 30 and manager.committed() == ["step-00000030", "step-00000040"]
    _save(manager, 50)
    assert manager.committed() == ["step-00000040", "step-00000050"]


def test_saving_a_committed_step_does_not_overwrite_it(tmp_path):
    manager = CheckpointManager(open_storage(str(tmp_path)))
    assert _save(manager, 1) == _save(manager, 1, scale=-1.0) == "step-00000001"
    assert manager.load_latest().weights["w"].tolist() == [1.0, 1.0, 1.0]


def test_incomplete_folder_is_ignored_and_collected(tmp_path):
    storage = open_storage(str(tmp_path))
    manager = CheckpointManager(storage)
    _save(manager, 1)
    # A killed save of step 2: files but no COMMITTED marker; and a pointer naming it (cannot happen in save's
    # order, but a reader must not trust the pointer blindly).
    storage.write_bytes("checkpoints/step-00000002/weights.safetensors", b"truncated")
    storage.write_bytes("checkpoints/step-00000002/state.json", b'{"step": 2}')
    storage.write_bytes("checkpoints/latest", b"step-00000002")
    assert manager.load_latest().step == 1

    storage.delete("checkpoints/latest")
    assert manager.load_latest().step == 1
    _save(manager, 3)
    assert storage.list_dirs("checkpoints") == ["step-00000001", "step-00000003"]

    # Saving into the leftover folder of a killed attempt starts from an empty folder.
    storage.write_bytes("checkpoints/step-00000004/stale.bin", b"stale")
    _save(manager, 4)
    assert storage.list("checkpoints/step-00000004") == [f"checkpoints/step-00000004/{f}" for f in FILES]
    assert manager.load_latest().step == 4


def test_no_checkpoint_yet(tmp_path):
    assert CheckpointManager(open_storage(str(tmp_path / "fresh"))).load_latest() is None


def test_load_checkpoint_takes_a_run_dir_or_a_step_folder(tmp_path):
    manager = CheckpointManager(open_storage(str(tmp_path / "run")))
    for step in [1, 2]:
        _save(manager, step)
    assert load_checkpoint(str(tmp_path / "run")).step == 2
    step1 = load_checkpoint(f"file://{tmp_path}/run/checkpoints/step-00000001/")
    assert (step1.step, step1.name, step1.weights["w"].tolist()) == (1, "step-00000001", [1.0] * 3)


def test_load_checkpoint_refuses_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("hello")
    with pytest.raises(InputError, match=rf"{tmp_path}/notes is neither .* it holds todo\.txt"):
        load_checkpoint(str(tmp_path / "notes"))
    with pytest.raises(InputError, match=rf"{tmp_path}/missing .* holds nothing"):
        load_checkpoint(str(tmp_path / "missing"))

    storage = open_storage(str(tmp_path / "run"))
    storage.write_bytes(f"checkpoints/step-00000007/{PART}", b"partial")
    with pytest.raises(InputError, match=r"step-00000007 is an incomplete checkpoint: it has no COMMITTED"):
        load_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-00000007"))
    with pytest.raises(InputError, match=r"run directory .*/run has no committed checkpoint.*step-00000007"):
        load_checkpoint(str(tmp_path / "run"))


def test_checkpoints_on_s3(s3_bucket, s3_endpoint):
    uri = f"s3://{s3_bucket}/runs/exp1"
    storage = open_storage(uri, endpoint_url=s3_endpoint)
    manager = CheckpointManager(storage, keep=2)
    model, optimizer = _trained_adamw()
    weights = _weights(model)
    for step in [1, 2, 3]:
        manager.save(step, weights, optimizer.state_dict(), {"wandb_run_id": "r"}, "a: 1\n")
    assert storage.list_dirs("checkpoints") == ["step-00000002", "step-00000003"]
    assert storage.read_bytes("checkpoints/latest") == b"step-00000003"

    checkpoint = load_checkpoint(uri, endpoint_url=s3_endpoint)
    assert (checkpoint.step, checkpoint.uri) == (3, f"{uri}/checkpoints/step-00000003")
    _assert_bitwise_equal(weights, checkpoint.weights, "weights")
    _assert_bitwise_equal(optimizer.state_dict(), checkpoint.optimizer_state, "optimizer")
    assert load_checkpoint(f"{uri}/checkpoints/step-00000002", endpoint_url=s3_endpoint).step == 2
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/elsewhere is neither"):
        load_checkpoint(f"s3://{s3_bucket}/elsewhere", endpoint_url=s3_endpoint)


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of a save.

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from lens.storage import open_storage
    from lens.train.checkpoint import CheckpointManager

    manager = CheckpointManager(open_storage(sys.argv[1]))
    manager.save(1, {"w": torch.arange(6.0)}, {"state": {}, "param_groups": []}, {"cursor": 1}, "step: 1\\n")
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i}": torch.randn(12_500_000, generator=g) for i in range(4)}  # 200 MB of fp32
    w = weights["layer0"]
    adam = {"state": {0: {"step": torch.tensor(2.0), "exp_avg": w * 0.1, "exp_avg_sq": w * w}}, "param_groups": []}
    manager.save(2, weights, adam, {"cursor": 2}, "step: 2\\n")
    """
)


def _reached(folder: str, name: str, stage: str) -> bool:
    """Whether the writer's ``name`` in ``folder`` is "half-written" (its temp file has bytes) or "published"."""
    if stage == "published":
        return os.path.exists(os.path.join(folder, name))
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return False
    return any(e.name.startswith(f".{name}.") and e.name.endswith(".tmp") and e.stat().st_size > 0 for e in entries)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, stage",
    [
        (PART, "half-written"),  # 300 MB of weights and optimizer tensors
        ("optimizer.pt", "published"),  # then come the small files
        ("COMMITTED", "published"),  # then the pointer
    ],
    ids=["during-tensors", "during-small-files", "before-pointer"],
)
def test_kill_during_save_keeps_the_last_checkpoint(tmp_path, name, stage):
    run = tmp_path / "run"
    step2 = run / "checkpoints" / "step-00000002"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(run)], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _reached(str(step2), name, stage):
            assert proc.poll() is None, f"the writer exited ({proc.returncode}) before {name} was {stage}"
            assert time.monotonic() < deadline, f"{step2}/{name} was not {stage} within 120 s"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(os.listdir(step2))

    manager = CheckpointManager(open_storage(str(run)))
    checkpoint = manager.load_latest()
    pointer = (run / "checkpoints" / "latest").read_text()
    if stage == "half-written":  # a 300 MB write does not finish within the millisecond before the kill
        assert name not in left and "COMMITTED" not in left and any(f.endswith(".tmp") for f in left), left
    if pointer == "step-00000002":  # the kill came after the whole save
        assert "COMMITTED" in left
        g = torch.Generator().manual_seed(0)
        expected = {f"layer{i}": torch.randn(12_500_000, generator=g) for i in range(4)}
        assert checkpoint.step == 2 and checkpoint.weights.keys() == expected.keys()
        assert all(checkpoint.weights[k].equal(v) for k, v in expected.items())
    else:  # whatever step 2 left behind, step 1 is what resumes
        assert pointer == "step-00000001"
        assert (checkpoint.step, checkpoint.state, checkpoint.config_yaml) == (1, {"cursor": 1}, "step: 1\n")
        assert checkpoint.weights["w"].equal(torch.arange(6.0))

    assert _save(manager, 2) == (run / "checkpoints" / "latest").read_text() == step_dirname(2)
    assert sorted(os.listdir(step2)) == FILES  # no half-written or temp files left
    assert manager.load_latest().step == 2


# ---------------------------------------------------------------------------------------------------------------------
# Collective saves: ranks upload disjoint parts in parallel; `latest` moves by compare-and-swap, never backwards.


def _save_as_ranks(storage: Storage, world: int, step: int, weights, optimizer_state, fail_rank: int | None = None):
    """Run `save` on `world` threads standing in for ranks, with an `all_ok` that is a real rendezvous of them.
    Returns each rank's result (a folder name) or the exception it raised. `fail_rank` (local storage only):
    that rank's part upload fails."""
    barrier, votes, lock = threading.Barrier(world), [], threading.Lock()
    round_ok = {}

    def all_ok(ok: bool) -> bool:
        with lock:
            votes.append(ok)
        index = barrier.wait()
        if index == 0:
            round_ok["ok"] = all(votes)
            votes.clear()
        barrier.wait()
        return round_ok["ok"]

    class Failing(LocalStorage):  # this rank's part upload fails, like an S3 outage seen by one node
        def sub(self, prefix: str) -> Failing:
            return Failing(self._path(prefix))

        def write_bytes(self, key: str, data: bytes) -> None:
            if key.startswith("tensors-"):
                raise OSError(f"injected upload failure of {key}")
            super().write_bytes(key, data)

    results = [None] * world

    def rank_main(rank: int) -> None:
        manager = CheckpointManager(Failing(storage.root) if rank == fail_rank else storage)
        try:
            results[rank] = manager.save(step, weights, optimizer_state, {"cursor": step}, "a: 1\n", rank=rank,
                                         world=world, all_ok=all_ok)
        except Exception as e:  # noqa: BLE001 - returned to the test
            results[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_ranks_upload_disjoint_parts(storage):
    model, optimizer = _trained_adamw()
    weights = {**_weights(model), **{f"big{i}": torch.randn(1000 + i) for i in range(5)}}
    assert _save_as_ranks(storage, 3, 4, weights, optimizer.state_dict()) == ["step-00000004"] * 3
    folder = storage.sub("checkpoints/step-00000004")
    parts = [f"tensors-{r:05d}-of-00003.safetensors" for r in range(3)]
    assert json.loads(folder.read_bytes("COMMITTED"))["parts"] == parts
    names = [set(safetensors.torch.load(folder.read_bytes(p))) for p in parts]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    sizes = [len(folder.read_bytes(p)) for p in parts]
    assert max(sizes) < 0.6 * sum(sizes)  # balanced: no rank uploads (almost) everything
    checkpoint = CheckpointManager(storage).load_latest()
    _assert_bitwise_equal(weights, checkpoint.weights, "weights")
    _assert_bitwise_equal(optimizer.state_dict(), checkpoint.optimizer_state, "optimizer")


def test_a_rank_failing_its_upload_commits_nothing(tmp_path):
    storage = open_storage(str(tmp_path / "run"))
    _save(CheckpointManager(storage), 1)
    results = _save_as_ranks(storage, 2, 2, {"w": torch.ones(4), "v": torch.zeros(4)}, {"state": {}}, fail_rank=1)
    assert isinstance(results[1], OSError) and "injected" in str(results[1])
    assert isinstance(results[0], OSError) and "another rank failed" in str(results[0])
    assert not storage.exists("checkpoints/step-00000002/COMMITTED")
    assert CheckpointManager(storage).load_latest().step == 1
    assert storage.read_bytes("checkpoints/latest") == b"step-00000001"


def test_latest_never_moves_back(tmp_path):
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage, keep=5)
    _save(manager, 5)
    _save(manager, 3)  # a save that a restarted generation overtook finishes late
    assert storage.read_bytes("checkpoints/latest") == b"step-00000005"
    assert manager.load_latest().step == 5


def test_conditional_write(storage):
    assert storage.write_if("p", b"one", None)
    assert not storage.write_if("p", b"two", None)  # exists already
    data, version = storage.read_versioned("p")
    assert data == b"one"
    assert storage.write_if("p", b"three", version)
    assert not storage.write_if("p", b"four", version)  # stale version: someone wrote since
    assert storage.read_bytes("p") == b"three"
    with pytest.raises(FileNotFoundError):
        storage.read_versioned("absent")
