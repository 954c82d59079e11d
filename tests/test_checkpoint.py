"""Checkpoints and the storage layer under them: round trips, garbage collection, kill -9 mid-save, S3 on loopback,
sharded saves by torchrun ranks (FSDP2) that load at other world sizes, and checkpoints that do not load."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import boto3
import numpy as np
import pytest
import torch
from torch import nn

from lens.errors import InputError, RetryableError
from lens.storage import LocalStorage, S3Storage, Storage, open_storage
from lens.train.checkpoint import (
    WRITE_THREADS,
    CheckpointManager,
    is_damage,
    apply_training_state,
    load_checkpoint,
    rng_state,
    set_rng_state,
    step_dirname,
    training_state,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = [f"__0_{t}.distcp" for t in range(WRITE_THREADS)]  # one process: rank 0's files, one per write thread
FILES = sorted([".metadata", "COMMITTED", "config.yaml", "rng.pt", "state.json", *SHARDS])


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


def test_storage_move_prefix(storage):
    for key in ["a/x", "a/sub/y", "ab/z"]:
        storage.write_bytes(key, key.encode())
    storage.move_prefix("a", "moved/a")
    assert storage.list() == ["ab/z", "moved/a/sub/y", "moved/a/x"]
    assert storage.read_bytes("moved/a/sub/y") == b"a/sub/y" and storage.list_dirs() == ["ab", "moved"]
    with pytest.raises(FileExistsError, match="moved/a"):
        storage.move_prefix("ab", "moved/a")
    assert storage.list("ab") == ["ab/z"]  # nothing moved


def test_local_storage_hides_a_killed_writers_temp_file(tmp_path):
    storage = open_storage(str(tmp_path))
    storage.write_bytes("d/obj", b"x")
    (tmp_path / "d" / ".obj.k3j_x9q2.tmp").write_bytes(b"half")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".w.abcdefgh.tmp").write_bytes(b"half")
    assert storage.list() == ["d/obj"]
    assert storage.list_dirs() == ["d"]


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints in one process.


def _trained_adamw(seed: int = 0) -> tuple[nn.Module, torch.optim.AdamW]:
    """Two layers, the second frozen (as the frozen model of a lens): a checkpoint holds only the first."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW(model[0].parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 5)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def _tensors(model: nn.Module, optimizer) -> dict:
    """The state a trainer saves, plus values a lossy round trip would change: NaN payloads, -0.0, denormals,
    infinities."""
    tensors = training_state(model, optimizer)
    tensors["model"]["odd"] = torch.tensor([float("nan"), -0.0, 1e-45, float("inf"), -float("inf"), 1 / 3])
    return tensors


def _assert_bitwise_equal(a: object, b: object, where: str = "") -> None:
    """Recursive equality where tensors must match in dtype, shape and every bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {sorted(a)} vs {sorted(b)}"
        for key in a:
            _assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
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
    return manager.save(step, {"model": {"w": torch.full((3,), float(step) * scale)}}, {"cursor": step},
                        f"step: {step}\n")


def test_round_trip_is_bitwise(tmp_path):
    model, optimizer = _trained_adamw()
    tensors = _tensors(model, optimizer)
    state = {"cursor": {"epoch": 1, "index": 1234}, "scheduler": {"last_epoch": 3}, "wandb_run_id": "abc123"}
    manager = CheckpointManager(open_storage(str(tmp_path / "run")))

    name = manager.save(3, tensors, state, "run:\n  name: test\n")
    after_save = _draws()
    _draws()  # move every generator on
    checkpoint = manager.load_latest()
    set_rng_state(checkpoint.rng)

    assert _draws() == after_save
    assert (checkpoint.step, checkpoint.name, checkpoint.state) == (3, name, state) and name == "step-00000003"
    assert checkpoint.config_yaml == "run:\n  name: test\n"
    assert checkpoint.uri == str(tmp_path / "run" / "checkpoints" / "step-00000003")
    assert set(checkpoint.weights) == {"0.weight", "0.bias", "odd"}  # the frozen layer is not saved
    _assert_bitwise_equal(tensors, checkpoint.read(), "whole")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / name)) == FILES
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == name
    assert json.loads((tmp_path / "run" / "checkpoints" / name / "COMMITTED").read_text()) == {
        "step": 3, "world": 1, "files": [f for f in FILES if f != "COMMITTED"]}

    # Loaded into another model and optimizer in place, they continue exactly as the originals do (the frozen layer
    # comes from elsewhere, as the frozen model from the hub).
    restored_model, restored = _trained_adamw(seed=1)
    restored_model[1].load_state_dict(model[1].state_dict())
    into = training_state(restored_model, restored)
    checkpoint.load_into(into)
    apply_training_state(restored_model, restored, into)
    _assert_bitwise_equal(training_state(model, optimizer), training_state(restored_model, restored), "loaded")
    x = torch.randn(8, 5)
    for m, opt in [(model, optimizer), (restored_model, restored)]:
        opt.zero_grad()
        m(x).pow(2).mean().backward()
        opt.step()
    _assert_bitwise_equal(dict(model.named_parameters()), dict(restored_model.named_parameters()), "after a step")


def test_async_save_commits_only_after_the_upload(tmp_path):
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage)
    _save(manager, 1)
    weights = {"w": torch.arange(1_000_000.0)}
    pending = manager.start_save(2, {"model": weights}, {"cursor": 2}, "a: 1\n")
    weights["w"].zero_()  # training goes on: the upload holds a copy made before start_save returned
    assert storage.read_bytes("checkpoints/latest") == b"step-00000001"
    assert not storage.exists("checkpoints/step-00000002/COMMITTED")
    assert pending.finish() == "step-00000002" and pending.done()
    assert storage.read_bytes("checkpoints/latest") == b"step-00000002"
    assert manager.load_latest().weights["w"].equal(torch.arange(1_000_000.0))


def test_async_save_time_is_stamped_when_the_upload_ends(tmp_path):
    """The save's seconds (the preemption estimate) end at the commit, not when the training loop next looks."""
    manager = CheckpointManager(open_storage(str(tmp_path / "run")))
    pending = manager.start_save(1, {"model": {"w": torch.arange(1000.0)}}, {"cursor": 1}, "a: 1\n")
    while not pending.done():
        time.sleep(0.01)
    time.sleep(1.0)  # training steps meanwhile
    assert pending.finish() == "step-00000001" and pending.step == 1
    assert 0 < pending.seconds < time.perf_counter() - pending.started - 0.9


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
        CheckpointManager(open_storage(str(tmp_path))).save(1, {}, {"step": 1}, "")
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
    storage.write_bytes("checkpoints/step-00000002/__0_0.distcp", b"truncated")
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
    assert CheckpointManager(open_storage(str(tmp_path / "fresh"))).resume(lambda c: None) is None


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
    storage.write_bytes("checkpoints/step-00000007/__0_0.distcp", b"partial")
    with pytest.raises(InputError, match=r"step-00000007 is an incomplete checkpoint: it has no COMMITTED"):
        load_checkpoint(str(tmp_path / "run" / "checkpoints" / "step-00000007"))
    with pytest.raises(InputError, match=r"run directory .*/run has no committed checkpoint.*step-00000007"):
        load_checkpoint(str(tmp_path / "run"))


def test_checkpoints_on_s3(s3_bucket, s3_endpoint):
    uri = f"s3://{s3_bucket}/runs/exp1"
    storage = open_storage(uri, endpoint_url=s3_endpoint)
    manager = CheckpointManager(storage, keep=2)
    model, optimizer = _trained_adamw()
    tensors = _tensors(model, optimizer)
    for step in [1, 2, 3]:
        manager.save(step, tensors, {"wandb_run_id": "r"}, "a: 1\n")
    assert storage.list_dirs("checkpoints") == ["step-00000002", "step-00000003"]
    assert storage.read_bytes("checkpoints/latest") == b"step-00000003"
    assert sorted(k.rpartition("/")[2] for k in storage.list("checkpoints/step-00000003")) == FILES

    checkpoint = load_checkpoint(uri, endpoint_url=s3_endpoint)
    assert (checkpoint.step, checkpoint.uri) == (3, f"{uri}/checkpoints/step-00000003")
    _assert_bitwise_equal(tensors, checkpoint.read(), "whole")
    restored_model, restored = _trained_adamw(seed=1)
    into = training_state(restored_model, restored)
    checkpoint.load_into(into)
    _assert_bitwise_equal(training_state(model, optimizer), into, "loaded in place")
    assert load_checkpoint(f"{uri}/checkpoints/step-00000002", endpoint_url=s3_endpoint).step == 2
    with pytest.raises(InputError, match=rf"s3://{s3_bucket}/elsewhere is neither"):
        load_checkpoint(f"s3://{s3_bucket}/elsewhere", endpoint_url=s3_endpoint)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints that do not load: reported in one line, skipped, moved aside (never deleted); resume falls back.


def _truncate_a_shard(folder):
    shard = max((p for p in folder.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _drop_optimizer_state(folder):
    """Replace the checkpoint by one whose optimizer has no state: it does not fit the optimizer it must fill."""
    tensors = dict(training_state(*_trained_adamw()))
    tensors["optimizer"] = {"state": {}, "param_groups": tensors["optimizer"]["param_groups"]}
    for p in folder.iterdir():
        if p.name.endswith(".distcp") or p.name == ".metadata":
            p.unlink()
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=open_storage(str(folder)).dcp_writer(), no_dist=True)


DAMAGE = {  # how to spoil a committed checkpoint, and what the one line says of it
    "truncated-shard": (_truncate_a_shard, r"rank 0: (EOFError|UnpicklingError|RuntimeError)"),
    "garbled-marker": (lambda f: (f / "COMMITTED").write_text("{not json"),
                       r"DamagedCheckpoint: .*COMMITTED is unreadable"),
    "garbled-metadata": (lambda f: (f / ".metadata").write_bytes(b"\0garbage"), r"rank 0: .*metadata read failed"),
    "missing-rng": (lambda f: (f / "rng.pt").unlink(), r"FileNotFoundError: .*rng\.pt"),
    "bad-optimizer-state": (_drop_optimizer_state, r"rank 0: RuntimeError: Missing key .*optimizer\.state"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_falls_back_past_a_checkpoint_that_does_not_load(tmp_path, caplog, damage):
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage, keep=5)
    model, optimizer = _trained_adamw()
    manager.save(1, training_state(model, optimizer), {"cursor": 1}, "a: 1\n")
    expected = {k: v.clone() for k, v in training_state(model, optimizer)["model"].items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    manager.save(2, training_state(model, optimizer), {"cursor": 2}, "a: 1\n")
    broken = tmp_path / "run" / "checkpoints" / "step-00000002"
    spoil, why = DAMAGE[damage]
    spoil(broken)
    files = sorted(p.name for p in broken.iterdir())

    restored_model, restored = _trained_adamw(seed=1)
    into = training_state(restored_model, restored)

    def load(checkpoint):
        checkpoint.load_into(into)
        apply_training_state(restored_model, restored, into)

    with caplog.at_level("WARNING", logger="lens.train.checkpoint"):
        checkpoint = manager.resume(load)
    assert checkpoint.step == 1 and checkpoint.state == {"cursor": 1}
    _assert_bitwise_equal(expected, training_state(restored_model, restored)["model"], "fell back to step 1")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("lens.")]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert re.search(rf"^checkpoint {broken} does not load \({why}.*\); trying the one before it$", errors[0]), errors
    assert any("resuming from" in r.getMessage() and "skipped step-00000002" in r.getMessage()
               for r in caplog.records)
    # Kept for inspection, whole, with the reason; the next save of step 2 is a fresh folder.
    aside = tmp_path / "run" / "checkpoints" / "unloadable" / "step-00000002"
    assert sorted(p.name for p in aside.iterdir()) == sorted(files + ["REASON"]) and not broken.exists()
    assert (aside / "REASON").read_text().strip() in errors[0]
    assert manager.committed() == ["step-00000001"] and manager.load_latest().step == 1
    assert _save(manager, 2) == "step-00000002" and manager.load_latest().step == 2
    assert aside.exists()  # garbage collection never touches it


def test_resume_refuses_when_no_checkpoint_loads(tmp_path):
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage)
    for step in (1, 2):
        _save(manager, step)
        (tmp_path / "run" / "checkpoints" / step_dirname(step) / "COMMITTED").write_text("garbled")
    with pytest.raises(InputError, match=r"none of the committed checkpoints in .*/run/checkpoints loads \(skipped "
                                         r"step-00000002, step-00000001;"):
        manager.resume(lambda checkpoint: None)
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "unloadable")) == ["step-00000001", "step-00000002"]


def test_damage_is_told_from_a_storage_fault():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    outage = EndpointConnectionError(endpoint_url="http://127.0.0.1:9")
    throttled = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "GetObject")
    for fault in (outage, throttled, OSError(5, "Input/output error"), InputError("S3 bucket 'b' rejected the "
                  "credentials"), CheckpointException("load", {0: _wrap_exception(EOFError()),
                                                               1: _wrap_exception(outage)})):
        assert not is_damage(fault), fault
    for damage in (EOFError(), ValueError("bad json"), FileNotFoundError("no object at x/rng.pt"),
                   RuntimeError("Missing key in checkpoint state_dict: optimizer.state.0"),
                   CheckpointException("load", {0: _wrap_exception(EOFError())})):
        assert is_damage(damage), damage


@pytest.mark.parametrize("fault", ["outage", "credentials"])
def test_a_storage_fault_during_resume_leaves_the_checkpoint_in_place(s3_bucket, s3_endpoint, monkeypatch, fault):
    """S3 that stops serving a good checkpoint mid-read (after its retries) is no damage: nothing is moved aside,
    and the error propagates, retryable for an outage and bad input for refused credentials."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    import lens.storage

    storage = open_storage(f"s3://{s3_bucket}/run", endpoint_url=s3_endpoint)
    manager = CheckpointManager(storage, keep=5)
    for step in (1, 2):
        _save(manager, step)
    monkeypatch.setattr(lens.storage, "S3_BACKOFF", (0.01, 0.01))
    get_object = storage.client.get_object

    def failing(**kwargs):  # the server answers the listing and the marker, then stops
        if kwargs["Key"].endswith("rng.pt"):
            if fault == "outage":
                raise EndpointConnectionError(endpoint_url=s3_endpoint)
            raise ClientError({"Error": {"Code": "ExpiredToken"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                              "GetObject")
        return get_object(**kwargs)

    monkeypatch.setattr(storage.client, "get_object", failing)
    expected = (RetryableError, r"could not read checkpoint .*step-00000002 .*EndpointConnectionError.*not damaged") \
        if fault == "outage" else (InputError, "expired token")
    with pytest.raises(expected[0], match=expected[1]):
        manager.resume(lambda checkpoint: None)
    assert manager.committed() == ["step-00000001", "step-00000002"]
    assert not storage.list("checkpoints/unloadable")
    monkeypatch.setattr(storage.client, "get_object", get_object)  # the server is back: the next start resumes
    assert manager.resume(lambda checkpoint: None).step == 2


def test_a_shard_missing_on_s3_is_damage(s3_bucket, s3_endpoint):
    """DCP's S3 reader reports a missing object like an outage; the storage layer tells it is missing."""
    storage = open_storage(f"s3://{s3_bucket}/run", endpoint_url=s3_endpoint)
    manager = CheckpointManager(storage, keep=5)
    model, optimizer = _trained_adamw()
    for step in (1, 2):
        manager.save(step, training_state(model, optimizer), {"cursor": step}, "a: 1\n")
    shard = max(k for k in storage.list("checkpoints/step-00000002") if k.endswith(".distcp"))
    storage.delete(shard)
    restored_model, restored = _trained_adamw(seed=1)
    into = training_state(restored_model, restored)
    assert manager.resume(lambda checkpoint: checkpoint.load_into(into)).step == 1
    reason = storage.read_bytes("checkpoints/unloadable/step-00000002/REASON").decode()
    assert reason.startswith("FileNotFoundError: no object at s3://"), reason


def test_a_failed_move_aside_stops_the_resume(tmp_path, monkeypatch):
    """Rank 0 failing to move a damaged checkpoint aside is raised (on every rank: they agree), not skipped over."""
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage, keep=5)
    for step in (1, 2):
        _save(manager, step)
    (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMMITTED").write_text("garbled")

    def refuse(prefix, to):
        raise PermissionError(f"cannot move {prefix}")

    monkeypatch.setattr(storage, "move_prefix", refuse)
    with pytest.raises(PermissionError, match="cannot move checkpoints/step-00000002"):
        manager.resume(lambda checkpoint: None)


def test_each_broken_copy_of_a_step_is_kept_under_its_own_name(tmp_path):
    """Step 2 saved and found broken three times over (in the same second, too): three folders, none overwritten."""
    storage = open_storage(str(tmp_path / "run"))
    manager = CheckpointManager(storage, keep=5)
    _save(manager, 1)
    for attempt in range(3):
        _save(manager, 2)
        (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMMITTED").write_text(f"garbled {attempt}")
        assert manager.resume(lambda checkpoint: None).step == 1
    names = storage.list_dirs("checkpoints/unloadable")
    assert names == ["step-00000002", "step-00000002-1", "step-00000002-2"]
    for attempt, name in enumerate(names):
        committed = storage.read_bytes(f"checkpoints/unloadable/{name}/COMMITTED").decode()
        assert committed == f"garbled {attempt}"  # each copy as it was found
        assert storage.exists(f"checkpoints/unloadable/{name}/REASON")


def test_a_config_mismatch_is_not_a_broken_checkpoint(tmp_path):
    manager = CheckpointManager(open_storage(str(tmp_path / "run")))
    _save(manager, 1)

    def load(checkpoint):
        raise InputError("config error: model.layer=2 differs")

    with pytest.raises(InputError, match="model.layer"):
        manager.resume(load)
    assert manager.committed() == ["step-00000001"]  # not moved aside


# ---------------------------------------------------------------------------------------------------------------------
# kill -9 in the middle of a save (one process).

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from lens.storage import open_storage
    from lens.train.checkpoint import CheckpointManager

    manager = CheckpointManager(open_storage(sys.argv[1]))
    manager.save(1, {"model": {"w": torch.arange(6.0)}}, {"cursor": 1}, "step: 1\\n")
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i}": torch.randn(12_500_000, generator=g) for i in range(4)}  # 200 MB of fp32
    w = weights["layer0"]
    adam = {"state": {"layer0": {"step": torch.tensor(2.0), "exp_avg": w * 0.1, "exp_avg_sq": w * w}}}
    manager.save(2, {"model": weights, "optimizer": adam}, {"cursor": 2}, "step: 2\\n")
    """
)


def _reached(folder: str, name: str, stage: str) -> bool:
    """Whether ``name`` in ``folder`` is "half-written" (DCP writes its shards in place: it has bytes) or
    "published"."""
    path = os.path.join(folder, name)
    if stage == "published":
        return os.path.exists(path)
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, stage",
    [
        (SHARDS[0], "half-written"),  # 300 MB of weights and optimizer tensors
        (".metadata", "published"),  # DCP's index, written last of DCP's files
        ("COMMITTED", "published"),  # then the pointer
    ],
    ids=["during-tensors", "after-metadata", "before-pointer"],
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
        assert ".metadata" not in left and "COMMITTED" not in left, left
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


# ---------------------------------------------------------------------------------------------------------------------
# Sharded saves by real torchrun ranks (gloo): FSDP2 shards written by their owners, loaded at other world sizes.

_RANKS = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lens.storage import open_storage
    from lens.train.checkpoint import CheckpointManager, apply_training_state, training_state
    from lens.train.dist import exit_process, shutdown

    mode, run, out = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    open(f"{out}/pid-{mode}-{rank}", "w").write(str(os.getpid()))

    def all_ok(ok):
        failed = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(failed)
        return failed.item() == 0

    def lens_like(seed):
        # A frozen block (the frozen model) and trainable blocks of sizes no world size divides evenly,
        # each trainable block FSDP2-sharded over the ranks, as the trainer shards transformer blocks.
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(7, 7), *[nn.Sequential(nn.Linear(7, 7), nn.Tanh()) for _ in range(3)],
                              nn.Linear(7, 5))
        model[0].requires_grad_(False)
        mesh = init_device_mesh("cpu", (world,))
        for block in list(model)[1:]:
            fully_shard(block, mesh=mesh)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, optimizer

    def dump_whole(model, optimizer, name):
        whole = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=True))
        if rank == 0:
            torch.save(whole, f"{out}/{name}.pt")

    manager = CheckpointManager(open_storage(run))
    if mode == "save":
        model, optimizer = lens_like(0)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            model(torch.randn(4, 7, generator=g)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        manager.save(3, training_state(model, optimizer), {"cursor": 3}, "a: 1\\n", rank=rank, world=world,
                     all_ok=all_ok)
        dump_whole(model, optimizer, f"saved-at-{world}")
    elif mode == "load":
        model, optimizer = lens_like(1)
        tensors = training_state(model, optimizer)
        def load(checkpoint):
            checkpoint.load_into(tensors)
            apply_training_state(model, optimizer, tensors)
        assert manager.resume(load, rank=rank, all_ok=all_ok).step == 3
        dump_whole(model, optimizer, f"loaded-at-{world}")
    elif mode in ("kill", "fail"):
        manager.save(1, {"model": {"w": torch.arange(6.0)}}, {"cursor": 1}, "step: 1\\n", rank=rank, world=world,
                     all_ok=all_ok)
        if mode == "fail" and rank == 1:  # this rank's upload fails, like an S3 outage seen by one node
            from torch.distributed.checkpoint import FileSystemWriter
            def write_data(self, plan, planner):
                raise OSError("injected upload failure")
            FileSystemWriter.write_data = write_data
        g = torch.Generator().manual_seed(0)
        weights = {f"layer{i}": torch.randn(12_500_000, generator=g) for i in range(4)}  # 200 MB, replicated
        try:
            manager.save(2, {"model": weights}, {"cursor": 2}, "step: 2\\n", rank=rank, world=world, all_ok=all_ok)
        except Exception as e:
            print(f"rank {rank} save failed: {type(e).__name__}: {e}".splitlines()[0], flush=True)
            sys.exit(3)
    shutdown(finished=True)
    exit_process(0)
    """
)


def _torchrun(tmp_path, nproc: int, *args: str, wait: bool = True):
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--standalone", f"--nproc-per-node={nproc}", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_at_other_world_sizes_bitwise(tmp_path):
    run, out = tmp_path / "run", tmp_path
    rc, log = _torchrun(tmp_path, 2, "save", str(run), str(out))
    assert rc == 0, log[-3000:]
    folder = run / "checkpoints" / "step-00000003"
    sizes = {r: sum(p.stat().st_size for p in folder.glob(f"__{r}_*.distcp")) for r in range(2)}
    # Each rank wrote only its own shards: about half each, not all on one rank.
    assert all(0.3 < size / sum(sizes.values()) < 0.7 for size in sizes.values()), sizes
    saved = torch.load(out / "saved-at-2.pt", weights_only=True)
    assert set(saved[0]) == {f"{i}.{p}" for i in (1, 2, 3) for p in ("0.weight", "0.bias")} | {"4.weight",
                                                                                              "4.bias"}
    for world in (1, 3):
        rc, log = _torchrun(tmp_path, world, "load", str(run), str(out))
        assert rc == 0, log[-3000:]
        loaded = torch.load(out / f"loaded-at-{world}.pt", weights_only=True)
        _assert_bitwise_equal(saved, loaded, f"world 2 -> {world}")
    # One process without a process group (what `lens eval` does) reads the same whole tensors.
    whole = load_checkpoint(str(run)).read()
    _assert_bitwise_equal(saved[0], whole["model"], "one process")
    _assert_bitwise_equal(saved[1]["state"], whole["optimizer"]["state"], "one process: optimizer")


@pytest.mark.slow
def test_sigkill_during_a_sharded_save_leaves_latest_on_the_committed_step(tmp_path):
    run, out = tmp_path / "run", tmp_path
    proc = _torchrun(tmp_path, 2, "kill", str(run), str(out), wait=False)
    step2 = run / "checkpoints" / "step-00000002"
    try:
        deadline = time.monotonic() + 180
        while not any(p.stat().st_size > 0 for p in step2.glob("__1_*.distcp")) if step2.exists() else True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "rank 1 did not start writing step 2 within 180 s"
            time.sleep(0.001)
        os.kill(int((out / "pid-kill-1").read_text()), signal.SIGKILL)  # rank 1, mid-write
        log, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, log[-3000:]
    assert (run / "checkpoints" / "latest").read_text() == "step-00000001"
    assert not (step2 / "COMMITTED").exists() and not (step2 / ".metadata").exists(), sorted(os.listdir(step2))
    checkpoint = CheckpointManager(open_storage(str(run))).load_latest()
    assert (checkpoint.step, checkpoint.state) == (1, {"cursor": 1}) and checkpoint.weights["w"].equal(
        torch.arange(6.0))


@pytest.mark.slow
def test_a_rank_failing_its_upload_commits_nothing(tmp_path):
    run, out = tmp_path / "run", tmp_path
    rc, log = _torchrun(tmp_path, 2, "fail", str(run), str(out))
    assert rc != 0
    # Both ranks learn of the failure (DCP gathers every rank's write result before its metadata), in one line.
    for rank in (0, 1):
        assert re.search(rf"rank {rank} save failed: OSError: saving checkpoint .*step-00000002 failed \(rank 1: "
                         rf"OSError: injected upload failure\); not committing it", log), log[-3000:]
    assert not (run / "checkpoints" / "step-00000002" / "COMMITTED").exists()
    assert not (run / "checkpoints" / "step-00000002" / ".metadata").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step-00000001"
    assert CheckpointManager(open_storage(str(run))).load_latest().step == 1


# ---------------------------------------------------------------------------------------------------------------------
# The trainer with async saves: training goes on during the upload, and the resume is exact.


def _lens_train(tiny_files, tmp_path, name: str, steps: int, *overrides: str, **sections) -> str:
    """`lens train` of the tiny lens for `steps` steps into tmp_path/name (checkpoint every 2); its output."""
    import yaml

    from conftest import tiny_run_config

    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "LENS_CACHE": str(tmp_path / "cache")}
    cfg = tiny_run_config(tiny_files, "tiny", tmp_path / name, train={"max_steps": steps}, **sections)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "lens", "train", str(tmp_path / f"{name}.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_trainer_with_async_checkpoints_resumes_exactly(tiny_files, tmp_path):
    def train(name: str, steps: int, *overrides: str) -> str:
        return _lens_train(tiny_files, tmp_path, name, steps, *overrides)

    train("sync", 4)
    first = train("async", 2, "train.async_checkpoint=true")
    assert "training goes on while it uploads" in first and "checkpoint step-00000002 committed" in first
    second = train("async", 4, "train.async_checkpoint=true")
    assert "resumed from" in second and "at step 2" in second
    a, b = load_checkpoint(str(tmp_path / "sync")), load_checkpoint(str(tmp_path / "async"))
    assert a.step == b.step == 4 and a.state == b.state
    _assert_bitwise_equal(a.read(), b.read(), "async vs sync")


@pytest.mark.slow
def test_a_trainable_encoder_base_resumes_exactly(tiny_files, tmp_path):
    """Its copy's blocks past encoder.layer never get a gradient, so the saved optimizer has no state for them: the
    resume loads what was saved (not a fresh optimizer's state for every parameter) and continues bitwise."""
    bases = {"encoder": {"train_base": True}}
    _lens_train(tiny_files, tmp_path, "straight", 4, **bases)
    _lens_train(tiny_files, tmp_path, "resumed", 2, **bases)
    assert "resumed from" in _lens_train(tiny_files, tmp_path, "resumed", 4, **bases)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "resumed"))
    never = [n for n in a.weights if n.startswith("encoder.lm.model.layers.3.")]
    assert never and not set(never) & set(a.optimizer_state["state"])  # no state for what no gradient reached
    assert a.step == b.step == 4
    _assert_bitwise_equal(a.read(), b.read(), "resumed vs straight")
