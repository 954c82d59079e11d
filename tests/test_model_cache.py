"""The model mirror (`model.cache`, lens/models/mirror.py) against a real S3 server on loopback (a `moto_server`).

The "hub" is an HF cache folder in the hub's own layout (`models--org--name/snapshots/<commit>/`, `refs/main`) holding
the tiny Llama, read with HF_HUB_OFFLINE=1; a start that must not touch the hub gets an empty HF cache instead, so
reading it would fail. Every start that stands for a new pod gets a fresh `$LENS_CACHE`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml

from _chaos import S3_TEST_ENV, S3Server
from conftest import REPO, tiny_run_config
from lens.config import DataConfig, LensConfig, ModelConfig, RunConfig
from lens.errors import InputError
from lens.models import mirror
from lens.models.hub import load_model, model_cache_root, model_mirror
from lens.storage import open_storage

HUB_ID = "lens-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
KEY = f"{HUB_ID}@main"

RACE = textwrap.dedent("""
    # Load the configured model like a trainer does, but hold the mirror's manifest write until both starters have
    # uploaded their copy (files in BARRIER), so that they really race for it.
    import os, sys, time
    from pathlib import Path
    import lens.storage as storage
    write_if = storage.S3Storage.write_if
    def racing_write_if(self, key, data, version):
        if key == "MANIFEST.json":
            barrier = Path(os.environ["BARRIER"])
            (barrier / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.05)
        return write_if(self, key, data, version)
    storage.S3Storage.write_if = racing_write_if
    from lens.config import load_config
    from lens.models.hub import load_model_for
    model, _ = load_model_for(load_config(sys.argv[1]))
    print("digest", sum(float(p.double().sum()) for p in model.parameters()))
""")


def digest(model) -> float:
    return sum(float(p.double().sum()) for p in model.parameters())


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_files) -> dict:
    """An HF cache holding the tiny Llama as hub model `lens-test/tiny-llama` at commit COMMIT (branch main)."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--lens-test--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_files["model_dir"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    files = mirror.snapshot_files(snapshot)
    assert "model.safetensors" in files and "config.json" in files
    ref, _ = load_model(str(tiny_files["model_dir"]))
    return {"cache": cache, "snapshot": snapshot, "files": files, "digest": digest(ref)}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def bucket(s3) -> str:
    name = f"mirror-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def env(s3, hub, tmp_path, monkeypatch) -> dict:
    """This process (in-process tests) and the base environment of subprocesses: S3 credentials for the moto
    server, the hub cache, offline, a fresh LENS_CACHE."""
    values = {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3.endpoint, "AWS_CONFIG_FILE": str(tmp_path / "none"),
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "HF_HUB_CACHE": str(hub["cache"]),
              "HF_HUB_OFFLINE": "1", "LENS_CACHE": str(tmp_path / "lens-cache"), "WANDB_MODE": "disabled",
              "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    # huggingface_hub reads these two when it is imported; this process imported it already
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return {**os.environ}


def no_hub(monkeypatch, tmp_path) -> None:
    """The hub is unreachable from here on: an empty HF cache, offline."""
    (tmp_path / "empty-hf").mkdir(exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf"))


def objects(s3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: s3.client().get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listing}


# --- the must-show: two starters race for an empty mirror, a third reads only the mirror and trains -----------------

def test_two_starters_make_one_mirror_and_a_third_trains_from_it_without_the_hub(s3, bucket, hub, env, tiny_files,
                                                                                 tmp_path):
    cfg = tiny_run_config(tiny_files, "mirror-race", tmp_path / "run", model={"name": HUB_ID, "layer": 1,
                                                                                "cache": f"s3://{bucket}/models"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "race.py").write_text(RACE)
    (tmp_path / "barrier").mkdir()
    starters = [subprocess.Popen([sys.executable, str(tmp_path / "race.py"), str(tmp_path / "cfg.yaml")],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**env, "LENS_CACHE": str(tmp_path / f"pod-{i}"),
                                      "BARRIER": str(tmp_path / "barrier")}) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in starters]
    for p, (out, err) in zip(starters, outs):
        assert p.returncode == 0, err[-3000:]
        assert float(out.split("digest")[-1]) == pytest.approx(hub["digest"], rel=0, abs=0)
    logs = [err for _, err in outs]
    assert len(list((tmp_path / "barrier").iterdir())) == 2  # both uploaded a copy before either published
    assert sum("mirrored" in log for log in logs) == 1
    assert sum("another process published the mirror" in log for log in logs) == 1

    # One complete mirror: one manifest naming one folder, which holds exactly the hub's files, byte for byte.
    stored = objects(s3, bucket, "models/")
    manifest = json.loads(stored.pop(f"models/{KEY}/MANIFEST.json"))
    assert manifest["commit"] == COMMIT and manifest["model"] == HUB_ID and manifest["revision"] == "main"
    folder = f"models/{KEY}/{manifest['folder']}/"
    assert sorted(stored) == sorted(folder + f for f in hub["files"])  # the loser's upload is gone
    for name in hub["files"]:
        data = stored[folder + name]
        assert data == (hub["snapshot"] / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # A third pod: the hub unreachable (an empty HF cache, offline), an empty local cache. It trains from the mirror.
    (tmp_path / "empty-hf").mkdir()
    pod = {**env, "LENS_CACHE": str(tmp_path / "pod-2"), "HF_HUB_CACHE": str(tmp_path / "empty-hf")}
    third = subprocess.run([sys.executable, "-m", "lens", "train", str(tmp_path / "cfg.yaml"), "train.max_steps=2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300, env=pod)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"fetched the model mirror s3://{bucket}/models/{KEY}" in third.stderr
    assert not any((tmp_path / "empty-hf").iterdir())
    copy = tmp_path / "pod-2" / "models" / KEY / manifest["folder"]
    assert sorted(p.name for p in copy.iterdir()) == hub["files"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip().endswith("2")


# --- what a reader trusts --------------------------------------------------------------------------------------------

def test_an_upload_without_a_manifest_is_not_a_mirror(s3, bucket, hub, env):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    store.write_bytes("dead-writer/config.json", b"{not a config")  # a writer killed before its manifest
    model, _ = load_model(HUB_ID, mirror_at=store)
    assert digest(model) == hub["digest"]
    manifest = json.loads(store.read_bytes(mirror.MANIFEST))
    assert manifest["folder"] != "dead-writer"
    assert store.exists(f"{manifest['folder']}/model.safetensors")


def test_a_start_that_finds_the_mirror_reads_neither_the_hub_nor_twice(s3, bucket, hub, env, tmp_path, monkeypatch,
                                                                        capfd):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    load_model(HUB_ID, mirror_at=store)  # publishes
    no_hub(monkeypatch, tmp_path)
    model, _ = load_model(HUB_ID, mirror_at=store)  # a restart on another node: fetched from S3
    assert digest(model) == hub["digest"]
    assert "fetched the model mirror" in capfd.readouterr().err
    model, _ = load_model(HUB_ID, mirror_at=store)  # a restart on the same node (node-local or PVC cache)
    assert digest(model) == hub["digest"]
    assert "reusing the local copy" in capfd.readouterr().err


def test_a_file_of_the_wrong_size_in_the_mirror_is_named(s3, bucket, hub, env, tmp_path, monkeypatch):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    load_model(HUB_ID, mirror_at=store)
    manifest = json.loads(store.read_bytes(mirror.MANIFEST))
    key = f"{manifest['folder']}/model.safetensors"
    store.write_bytes(key, store.read_bytes(key)[:-100])  # truncated
    no_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "other-node"))
    with pytest.raises(InputError, match=r"model mirror s3://.*: model.safetensors is damaged \(\d+ bytes, the "
                                         r"manifest says \d+\); delete s3://") as e:
        load_model(HUB_ID, mirror_at=store)
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "other-node" / "models" / KEY).iterdir())  # no partial copy left behind


def test_a_file_with_other_bytes_of_the_same_size_is_named(s3, bucket, hub, env, tmp_path, monkeypatch):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    load_model(HUB_ID, mirror_at=store)
    manifest = json.loads(store.read_bytes(mirror.MANIFEST))
    key = f"{manifest['folder']}/config.json"
    store.write_bytes(key, store.read_bytes(key).replace(b'"', b"'"))
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "other-node"))
    with pytest.raises(InputError, match="config.json is damaged .its sha256 differs"):
        load_model(HUB_ID, mirror_at=store)


def test_a_damaged_local_copy_is_fetched_again(s3, bucket, hub, env, tmp_path, monkeypatch, capfd):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    load_model(HUB_ID, mirror_at=store)
    no_hub(monkeypatch, tmp_path)
    load_model(HUB_ID, mirror_at=store)
    manifest = json.loads(store.read_bytes(mirror.MANIFEST))
    weights = Path(os.environ["LENS_CACHE"]) / "models" / KEY / manifest["folder"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # the node's disk lost the end of it
    capfd.readouterr()
    model, _ = load_model(HUB_ID, mirror_at=store)
    assert digest(model) == hub["digest"]
    assert "does not match the mirror (model.safetensors: 1000 bytes" in capfd.readouterr().err


def test_a_garbled_manifest_is_named(s3, bucket, hub, env):
    store = open_storage(f"s3://{bucket}/models", s3.endpoint).sub(KEY)
    store.write_bytes(mirror.MANIFEST, b'{"format": 1, "files": ')
    with pytest.raises(InputError, match=r"MANIFEST.json is damaged \(not a manifest"):
        load_model(HUB_ID, mirror_at=store)


def test_a_local_mirror_is_read_in_place(hub, env, tmp_path, monkeypatch):
    store = open_storage(str(tmp_path / "mirror")).sub(KEY)
    load_model(HUB_ID, mirror_at=store)
    no_hub(monkeypatch, tmp_path)
    model, _ = load_model(HUB_ID, mirror_at=store)
    assert digest(model) == hub["digest"]
    manifest = json.loads(store.read_bytes(mirror.MANIFEST))
    assert model.name_or_path == store.uri(manifest["folder"])
    assert not (Path(os.environ["LENS_CACHE"]) / "models" / KEY).exists()  # no second copy


def test_without_a_mirror_and_without_the_hub_a_hub_id_is_bad_input(env, tmp_path, monkeypatch):
    no_hub(monkeypatch, tmp_path)
    store = open_storage(str(tmp_path / "mirror")).sub(KEY)
    with pytest.raises(InputError, match=r"model.name='lens-test/tiny-llama'.*no copy yet.*HF_HUB_OFFLINE=1"):
        load_model(HUB_ID, mirror_at=store)
    assert not store.list()


# --- where the mirror is ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache, run_dir, activations, expected", [
    (None, "s3://runs/x", None, "s3://runs/models"),
    (None, "runs/x", "s3://acts/gemma/l20", "s3://acts/models"),
    (None, "runs/x", None, "{LENS_CACHE}/models"),
    ("s3://shared/mirrors", "s3://runs/x", None, "s3://shared/mirrors"),
    ("/mnt/models", "s3://runs/x", None, "/mnt/models"),
    ("none", "s3://runs/x", None, None),
    ("None", "s3://runs/x", None, None),
])
def test_the_mirror_lives_with_the_run_storage_unless_set(tmp_path, monkeypatch, cache, run_dir, activations,
                                                          expected):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path))
    cfg = LensConfig(run=RunConfig(dir=run_dir), model=ModelConfig(name=HUB_ID, cache=cache),
                     data=DataConfig(activations=activations, on_the_fly=activations is None))
    assert model_cache_root(cfg) == (expected.format(LENS_CACHE=tmp_path) if expected else None)
    if expected:
        assert model_mirror(cfg).uri().endswith(f"/{KEY}")


def test_local_models_have_no_mirror(tiny_files):
    for name in (str(tiny_files["model_dir"]), "HuggingFaceTB/SmolLM2-135M-Instruct"):
        assert model_mirror(LensConfig(model=ModelConfig(name=name, cache="s3://b/models"))) is None
    cfg = LensConfig(model=ModelConfig(name="google/gemma-2-2b", revision="refs/pr/3", cache="s3://b/models"))
    assert model_mirror(cfg).uri() == "s3://b/models/google/gemma-2-2b@refs--pr--3"


def test_no_mirror_loads_the_hub_cache_as_before(hub, env):
    model, _ = load_model(HUB_ID)  # model.cache: none
    assert digest(model) == hub["digest"]
    assert torch.float32 == next(model.parameters()).dtype
