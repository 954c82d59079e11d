"""The activation dump and its reader against a real S3 server on loopback (a `moto_server` process of our own).

Real `lens dump` processes with a tiny Llama: a reference dump, then a dump SIGKILLed midway and rerun, two worker
indexes as separate processes, and a dump whose S3 server is frozen (SIGSTOP) for a few seconds; each must produce
exactly the reference's objects, byte for byte. Plus the exit-2 cases and `ShardSource` reading the dump.
The server is frozen rather than killed because moto keeps its buckets in memory: a restarted one would be empty.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors

from _chaos import FaultProxy, S3Server


REPO = Path(__file__).resolve().parents[1]
N_SEQ, SHARD = 60, 8  # 57 train sequences -> 8 shards (the last one partial), 3 val sequences -> 1 shard
N_SHARDS = 9

SLOW = textwrap.dedent("""
    # `lens dump`, but each shard write is followed by a pause, so a test can act between two shards.
    import os, sys, time
    import lens.data.dump as dump
    write = dump.write_shard
    def slow_write(*args, **kwargs):
        write(*args, **kwargs)
        time.sleep(float(os.environ["SHARD_PAUSE"]))
    dump.write_shard = slow_write
    from lens.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto_server process on 127.0.0.1; yields {"endpoint", "proc"}."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    yield {"endpoint": server.endpoint, "proc": server.proc}
    server.proc.send_signal(signal.SIGCONT)  # in case a failed test left it frozen
    server.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_files, moto):
    root = tmp_path_factory.mktemp("dump")
    model_dir, corpus = tiny_files["model_dir"], tiny_files["corpus"]
    cfg = {
        "run": {"name": "tiny-dump", "dir": str(root / "unused"), "seed": 3},
        "model": {"name": str(model_dir), "layer": 1},
        "loss": {"resample_ablation": True},
        "data": {"corpus": str(corpus), "seq_len": 16, "max_sequences": N_SEQ, "on_the_fly": False,
                 "activations": "s3://unset/unset", "shard_size": SHARD, "dump_batch_size": 4},
        "wandb": {"mode": "disabled"},
    }
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (root / "slow_dump.py").write_text(SLOW)
    env = {**os.environ, "LENS_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto["endpoint"],
           "AWS_CONFIG_FILE": str(root / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(root / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_PROFILE", None)
    s3 = boto3.client("s3", endpoint_url=moto["endpoint"], region_name="us-east-1", aws_access_key_id="test",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket="acts")
    return {"root": root, "config": config, "env": env, "s3": s3, "moto": moto, "model_dir": model_dir,
            "corpus": corpus}


def dump_cmd(world, prefix: str, *extra: str, slow: bool = False) -> list[str]:
    head = [sys.executable, str(world["root"] / "slow_dump.py")] if slow else [sys.executable, "-m", "lens"]
    return head + ["dump", str(world["config"]), f"data.activations=s3://acts/{prefix}", *extra]


def run_dump(world, prefix: str, *extra: str, pause: float | None = None, timeout: float = 300):
    env = {**world["env"], "SHARD_PAUSE": str(pause or 0)}
    return subprocess.run(dump_cmd(world, prefix, *extra, slow=pause is not None), cwd=world["root"], env=env,
                          capture_output=True, text=True, timeout=timeout)


def start_dump(world, prefix: str, *extra: str, pause: float | None = None) -> subprocess.Popen:
    env = {**world["env"], "SHARD_PAUSE": str(pause or 0)}
    return subprocess.Popen(dump_cmd(world, prefix, *extra, slow=pause is not None), cwd=world["root"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def objects(world, prefix: str) -> dict[str, bytes]:
    """Every object under s3://acts/<prefix>/ by its key relative to the prefix."""
    s3 = world["s3"]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="acts", Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: s3.get_object(Bucket="acts", Key=k)["Body"].read() for k in keys}


def shards_of(world, prefix: str) -> list[str]:
    return [k for k in objects(world, prefix) if "shard-" in k]


def wait_for_shards(world, prefix: str, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while len(shards_of(world, prefix)) < n:
        assert proc.poll() is None, f"dump ended early: {proc.communicate()}"
        assert time.time() < deadline, "no shard appeared"
        time.sleep(0.05)


def ok(proc) -> None:
    out, err = (proc.stdout, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"


@pytest.fixture(scope="module")
def reference(world):
    """One uninterrupted single-process dump; its objects."""
    proc = run_dump(world, "ref")
    ok(proc)
    return objects(world, "ref")


# ------------------------------------------------------------------------------------------------ the dump itself


def test_dump_writes_every_shard_and_the_manifest(world, reference, tokenizer):
    import json

    manifest = json.loads(reference["manifest.json"])
    assert manifest["splits"] == {"train": {"count": 57, "shards": 8}, "val": {"count": 3, "shards": 1}}
    assert (manifest["d_model"], manifest["layers"], manifest["seq_len"], manifest["dtype"]) == (32, [1], 16, "float32")
    assert sorted(k for k in reference if not k.startswith("tokens/")) == sorted(
        ["manifest.json", "plan.json"] + [f"train/shard-{i:05d}.safetensors" for i in range(8)]
        + ["val/shard-00000.safetensors"])
    assert {"tokens/manifest.json", "tokens/plan.json", "tokens/shards/00000.bin"} <= set(reference)
    last = load_safetensors(reference["train/shard-00007.safetensors"])
    assert last["A.1"].shape == (1, 32) and last["A_prime.1"].shape == (1, 32)  # the final partial shard is written
    # A is block 1's output at token_pos, as a full forward with output_hidden_states computes it.
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(world["model_dir"]).eval()
    first = load_safetensors(reference["train/shard-00000.safetensors"])
    with torch.no_grad():
        for name, ids, pos in (("A.1", "input_ids", "token_pos"), ("A_prime.1", "input_ids_prime", "token_pos_prime")):
            hidden = lm(input_ids=first[ids], output_hidden_states=True).hidden_states[2]
            want = hidden[torch.arange(SHARD), first[pos]]
            torch.testing.assert_close(first[name], want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(first["input_ids"], first["input_ids_prime"])  # A' comes from other contexts


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_same_dataset(world, reference):
    proc = start_dump(world, "killed", pause=0.5)
    wait_for_shards(world, "killed", 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    before = objects(world, "killed")
    assert "manifest.json" not in before and 2 <= len(shards_of(world, "killed")) < N_SHARDS
    rerun = run_dump(world, "killed")
    ok(rerun)
    assert rerun.stdout.count("exists, skipped") >= 2
    after = objects(world, "killed")
    for key, data in before.items():  # finished shards were skipped, not rewritten (same bytes anyway)
        assert after[key] == data
    assert after == reference


@pytest.mark.slow
def test_two_indexes_in_separate_processes_form_one_dataset(world, reference):
    procs = [start_dump(world, "split", f"--index={i}", "--count=2") for i in (0, 1)]
    for p in procs:
        ok(p)
    assert objects(world, "split") == reference


@pytest.mark.slow
def test_s3_server_frozen_mid_dump_then_back(world, reference):
    moto = world["moto"]["proc"]
    proc = start_dump(world, "frozen", pause=0.3)
    wait_for_shards(world, "frozen", 1, proc)
    moto.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4)
        assert proc.poll() is None  # waiting on the server, not failed
    finally:
        moto.send_signal(signal.SIGCONT)
    ok(proc)
    assert objects(world, "frozen") == reference


@pytest.mark.slow
def test_s3_connections_refused_mid_dump_then_back(world, reference):
    proxy = FaultProxy(int(world["moto"]["endpoint"].rsplit(":", 1)[1]))
    world = {**world, "env": {**world["env"], "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}}
    proc = start_dump(world, "refused", pause=0.3)
    wait_for_shards(world, "refused", 1, proc)
    proxy.down()
    try:
        time.sleep(4)
        assert proc.poll() is None  # retrying, not failed
    finally:
        proxy.up()
    ok(proc)
    assert objects(world, "refused") == reference
    proxy.down()


def test_rerun_of_a_complete_dump_writes_nothing(world, reference):
    proc = run_dump(world, "ref")
    ok(proc)
    assert "already complete" in proc.stdout
    assert objects(world, "ref") == reference


def test_a_target_holding_another_dump_exits_2_and_keeps_it(world, reference):
    proc = run_dump(world, "ref", "model.layer=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "describes another dump (differs in: layers)" in last
    assert objects(world, "ref") == reference


def test_a_missing_bucket_exits_2_naming_it(world):
    proc = subprocess.run(dump_cmd(world, "x")[:-1] + ["data.activations=s3://no-such-bucket/x"], cwd=world["root"],
                          env=world["env"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "'no-such-bucket' does not exist" in proc.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ reading


@pytest.fixture
def s3_env(world, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
              "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "LENS_CACHE"):
        monkeypatch.setenv(k, world["env"][k])


def ref_expected(world, tokenizer, corpus=None, **overrides) -> dict:
    """The manifest the reference dump's config expects (`expected_manifest`), with `overrides` (a config edit)."""
    from lens.config import from_dictconfig
    from lens.data.corpus import Corpus
    from lens.data.shards import expected_manifest

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["model_dir"])  # as `lens dump` loads it
    raw = yaml.safe_load(world["config"].read_text())
    raw["data"]["activations"] = "s3://acts/ref"
    cfg = from_dictconfig(raw)
    corpus = corpus or Corpus.build(cfg.data, tokenizer)
    return {**expected_manifest(cfg, corpus, tokenizer, 32), **overrides}


def open_ref(world, tokenizer, expected=None, layer=1, **kwargs):
    from lens.data.shards import ShardSource

    return ShardSource.open("s3://acts/ref", expected or ref_expected(world, tokenizer), layer=layer, seed=3, **kwargs)


def test_shard_source_follows_the_on_the_fly_order(world, reference, s3_env, tokenizer):
    from lens.config import DataConfig
    from lens.data.corpus import Corpus
    from lens.data.source import OnTheFlySource, SampleCursor, split_for_rank

    corpus = Corpus.build(DataConfig(corpus=str(world["corpus"]), seq_len=16, max_sequences=N_SEQ), tokenizer)
    source = open_ref(world, tokenizer, cache_shards=2)
    fly = OnTheFlySource(corpus, seed=3, min_pos=4)
    assert source.n_train == fly.n_train == 57 and source.steps_per_epoch(10) == 6
    cursor = SampleCursor()
    seen = []
    for _ in range(14):  # two epochs and a bit, in batches of 10 split over 3 ranks
        batch = cursor.take(10)
        for rank in range(3):
            ids = split_for_rank(batch, rank, 3)
            input_ids, pos, A, A_prime = source.lookup(ids)
            assert torch.equal(input_ids, fly.lookup(ids)[0])
            assert A.shape == A_prime.shape == (len(ids), 32) and pos.shape == (len(ids),)
            seen.append(input_ids)
    seen = torch.cat(seen)
    # Each epoch visits every training sequence once (the 57 rows are distinct in this corpus).
    assert len({tuple(r) for r in seen[:57].tolist()}) == 57
    ids, pos, A, A_prime = source.val_batch(5)
    assert torch.equal(ids, corpus.val[torch.arange(5) % 3])
    source.close()


# Each field a sample depends on, a value another config would give it, and the config key the error names.
MANIFEST_EDITS = [
    ("format", 1, "dump format"), ("model", "other/model", "model.name"), ("d_model", 64, "d_model"),
    ("dtype", "bfloat16", "model.dtype"), ("tokenizer", "0123", "tokenizer"),
    ("corpus", "stdlib", "data.corpus"), ("text_field", "body", "data.text_field"),
    ("corpus_fingerprint", "0123", "corpus content"), ("seq_len", 32, "data.seq_len"), ("min_pos", 2, "data.min_pos"),
    ("max_sequences", 61, "data.max_sequences"), ("val_fraction", 0.5, "data.val_fraction"), ("seed", 4, "run.seed"),
    ("positions", "another rule", "position rule"),
]


def test_every_manifest_field_that_differs_is_refused_naming_it(world, reference, s3_env, tokenizer):
    from lens.data.shards import CHECKED
    from lens.errors import InputError

    assert {field for field, _, _ in MANIFEST_EDITS} == set(CHECKED)  # the table covers every checked field
    expected = ref_expected(world, tokenizer)
    open_ref(world, tokenizer, expected).close()  # this run's own config passes
    for field, value, named in MANIFEST_EDITS:
        with pytest.raises(InputError, match=rf"{field} is .*\(.*{named}") as e:
            open_ref(world, tokenizer, {**expected, field: value})
        assert "\n" not in str(e.value)
    # Another seq_len, max_sequences or val_fraction also changes the fingerprint: the setting is what is named.
    for field, value, named in [e for e in MANIFEST_EDITS if e[0] in ("seq_len", "max_sequences", "val_fraction")]:
        with pytest.raises(InputError, match=rf"{field} is .*\(.*{named}"):
            open_ref(world, tokenizer, {**expected, field: value, "corpus_fingerprint": "0123"})
    with pytest.raises(InputError, match=r"model.layer is 0 but the dump has layers=\[1\]"):
        open_ref(world, tokenizer, expected, layer=0)
    with pytest.raises(InputError, match="has no A' pairs"):
        manifest = json.loads(reference["manifest.json"])
        for key, data in reference.items():
            body = json.dumps({**manifest, "resample_ablation": False}).encode() if key == "manifest.json" else data
            world["s3"].put_object(Bucket="acts", Key=f"no-prime/{key}", Body=body)
        from lens.data.shards import ShardSource

        ShardSource.open("s3://acts/no-prime", expected, layer=1, seed=3)


@pytest.mark.slow
def test_training_on_a_dump_of_another_config_exits_2_naming_the_field(world, reference, tmp_path):
    cmd = [sys.executable, "-m", "lens", "train", str(world["config"]), "data.activations=s3://acts/ref",
           f"run.dir={tmp_path / 'run'}", "data.min_pos=2"]
    proc = subprocess.run(cmd, cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "min_pos is 4 there, 2 for this run (data.min_pos)" in proc.stderr.strip().splitlines()[-1]


def test_a_missing_dump_is_waited_for_then_retryable(world, s3_env, tokenizer):
    from lens.data.shards import ShardSource
    from lens.data.wait import DataNotReady

    with pytest.raises(DataNotReady, match="s3://acts/nothing-here is still not complete after "
                                           "data.wait_timeout=0.5 s \\(not started\\)"):
        ShardSource.open("s3://acts/nothing-here", ref_expected(world, tokenizer), layer=1, seed=3, wait_timeout=0.5)


def test_a_corrupt_shard_is_named_and_a_rerun_rewrites_it(world, reference, s3_env, tokenizer):
    from lens.data.shards import ShardSource
    from lens.errors import InputError

    for key, data in reference.items():
        if key == "train/shard-00003.safetensors":
            data = data[: len(data) // 2]  # a truncated object
        world["s3"].put_object(Bucket="acts", Key=f"corrupt/{key}", Body=data)
    world["s3"].delete_object(Bucket="acts", Key="corrupt/train/shard-00005.safetensors")
    expected = ref_expected(world, tokenizer)
    source = ShardSource.open("s3://acts/corrupt", expected, layer=1, seed=3)
    with pytest.raises(InputError, match="activation shard s3://acts/corrupt/train/shard-00003.safetensors is "
                                         "corrupt .*rerun `lens dump` with this config"):
        source.lookup(torch.arange(57))
    source = ShardSource.open("s3://acts/corrupt", expected, layer=1, seed=3, prefetch=False)
    in_shard_5 = (source.order.rows(torch.arange(57)) // SHARD == 5).nonzero().squeeze(1)  # global ids reading it
    with pytest.raises(InputError, match="shard s3://acts/corrupt/train/shard-00005.safetensors is missing"):
        source.lookup(in_shard_5)
    # The printed remedy works as printed: the rerun verifies every shard and rewrites the two bad ones.
    proc = run_dump(world, "corrupt")
    ok(proc)
    assert "2 rewritten" in proc.stdout
    assert objects(world, "corrupt") == reference


# ------------------------------------------------------------------------------------------------ storage errors


def test_s3_storage_names_a_missing_bucket(world, s3_env):
    from lens.errors import InputError
    from lens.storage import open_storage

    storage = open_storage("s3://no-such-bucket/p")
    with pytest.raises(InputError, match="'no-such-bucket' does not exist"):
        storage.check()
    with pytest.raises(InputError, match="'no-such-bucket' does not exist"):
        storage.write_bytes("k", b"x")


def test_s3_operations_retry_until_the_server_is_back(world, s3_env, monkeypatch, caplog):
    """The whole-operation retry alone (botocore's per-request retries off) rides out refused connections."""
    import lens.storage
    from lens.storage import open_storage

    monkeypatch.setattr(lens.storage, "BOTO_ATTEMPTS", 1)
    monkeypatch.setattr(lens.storage, "S3_BACKOFF", (0.2, 1.0))
    proxy = FaultProxy(int(world["moto"]["endpoint"].rsplit(":", 1)[1]))
    storage = open_storage("s3://acts/retry", endpoint_url=f"http://127.0.0.1:{proxy.port}")
    storage.write_bytes("a", b"before")
    proxy.down()
    threading.Timer(1.5, proxy.up).start()
    with caplog.at_level("WARNING", logger="lens.storage"):
        storage.write_bytes("b", b"during")
    assert "retry 1/" in caplog.text
    assert storage.read_bytes("b") == b"during"
    proxy.down()


@pytest.mark.parametrize("code,status,kind", [
    ("SlowDown", 503, "retry"), ("InternalError", 500, "retry"), ("503", 503, "retry"), ("Throttling", 400, "retry"),
    ("NoSuchBucket", 404, "input"), ("AccessDenied", 403, "input"), ("InvalidAccessKeyId", 403, "input"),
    ("NoSuchKey", 404, ""),
])
def test_s3_errors_are_classified(code, status, kind):
    from botocore.exceptions import ClientError

    from lens.storage import _classify

    e = ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")
    assert _classify(e)[0] == kind


def test_worker_slot_comes_from_flags_then_the_indexed_job(monkeypatch):
    from lens.data.dump import worker_slot
    from lens.errors import InputError

    for k in ("JOB_COMPLETION_INDEX", "JOB_COMPLETION_COUNT", "LENS_DUMP_WORKERS"):
        monkeypatch.delenv(k, raising=False)
    assert worker_slot(None, None) == (0, 1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("LENS_DUMP_WORKERS", "4")
    assert worker_slot(None, None) == (2, 4)
    monkeypatch.setenv("JOB_COMPLETION_COUNT", "3")
    assert worker_slot(None, None) == (2, 3)
    assert worker_slot(1, 2) == (1, 2)
    with pytest.raises(InputError, match="index 2 of 2 is invalid"):
        worker_slot(None, 2)


def test_a_local_target_gets_the_same_objects(world, reference, tmp_path):
    target = tmp_path / "acts"
    cmd = dump_cmd(world, "x")[:-1] + [f"data.activations={target}"]
    ok(subprocess.run(cmd, cwd=world["root"], env=world["env"], capture_output=True, text=True, timeout=300))
    local = {str(p.relative_to(target)): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert local == reference


def test_an_unknown_model_exits_2_and_writes_nothing(world):
    proc = run_dump(world, "unknown-model", "model.name=/no/such/model")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.name='/no/such/model'" in proc.stderr.strip().splitlines()[-1]
    assert objects(world, "unknown-model") == {}


# ------------------------------------------------------------------------------------- training from the dump

def train_cmd(world, run_dir: Path, steps: int, nproc: int, acts: str = "ref") -> list[str]:
    from conftest import torchrun

    args = ["train", str(world["config"]), f"data.activations=s3://acts/{acts}", f"run.dir={run_dir}",
            f"train.max_steps={steps}", "train.batch_size=6", "train.micro_batch_size=2", "train.checkpoint_every=2",
            "train.log_every=1", "train.eval_samples=3", "decoder.t_text=3", "optim.decay=constant"]
    return (torchrun(nproc) if nproc > 1 else [sys.executable]) + ["-m", "lens", *args]


def train_from_dump(world, run_dir: Path, steps: int, nproc: int) -> list[dict]:
    """`lens train` on the reference dump in S3 (resample ablation on), `nproc` torchrun workers; its metrics."""
    proc = subprocess.run(train_cmd(world, run_dir, steps, nproc), cwd=world["root"], env=world["env"],
                          capture_output=True, text=True, timeout=300)
    ok(proc)
    return metrics(run_dir)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_trainer_started_before_a_multi_layer_dump_waits_and_trains_as_on_a_single_layer_dump(world, reference):
    """The cluster's start order: the trainer comes up first and waits for the token store and the dump; the dump
    captures layers 0 and 1 in one pass; training reads model.layer=1 from it and trains the same lens, sample for
    sample, as a trainer started after the single-layer reference dump."""
    from lens.train.checkpoint import load_checkpoint

    early_dir = world["root"] / "train-early"
    trainer = subprocess.Popen(train_cmd(world, early_dir, 4, 1, acts="multi") + ["data.wait_timeout=600"],
                               cwd=world["root"], env=world["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines = []
    try:
        for line in trainer.stdout:  # the trainer is up and waiting before any data exists
            lines.append(line)
            if "waiting for token store s3://acts/multi/tokens" in line:
                break
        assert trainer.poll() is None, "".join(lines[-30:])
        ok(run_dump(world, "multi", "data.layers=[0,1]"))
        out = "".join(lines) + trainer.communicate(timeout=300)[0]
    finally:
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, out[-3000:]
    multi = objects(world, "multi")
    assert json.loads(multi["manifest.json"])["layers"] == [0, 1]
    one, both = (load_safetensors(d["train/shard-00002.safetensors"]) for d in (reference, multi))
    assert torch.equal(one["A.1"], both["A.1"]) and torch.equal(one["A_prime.1"], both["A_prime.1"])
    assert both["A.0"].shape == both["A.1"].shape and not torch.equal(both["A.0"], both["A.1"])

    late = metrics_by_step(train_from_dump(world, world["root"] / "train-late", 4, nproc=1))
    early = metrics_by_step(metrics(early_dir))
    assert sorted(early) == sorted(late) == [1, 2, 3, 4]
    for s in early:
        assert early[s]["data/next_sample"] == late[s]["data/next_sample"] == 6 * s
        assert early[s]["train/loss"] == late[s]["train/loss"], s
    wa, wb = load_checkpoint(str(early_dir)), load_checkpoint(str(world["root"] / "train-late"))
    for name, t in wa.weights.items():
        assert torch.equal(wb.weights[name], t), name


def metrics_by_step(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_training_from_s3_resumed_on_1_2_3_processes_consumes_the_uninterrupted_sequence(world, reference):
    from lens.train.checkpoint import load_checkpoint

    straight = train_from_dump(world, world["root"] / "train-straight", 6, nproc=1)
    resized = world["root"] / "train-resized"
    for steps, nproc in ((2, 1), (4, 2), (6, 3)):
        rows = train_from_dump(world, resized, steps, nproc)
    by_step = lambda rs: {r["step"]: r for r in rs if "train/loss" in r}  # noqa: E731
    a, b = by_step(straight), by_step(rows)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # exactly the same global samples, step by step: none repeated or skipped across the resizes
    assert [b[s]["data/next_sample"] for s in range(1, 7)] == [6 * s for s in range(1, 7)]
    assert [a[s]["data/next_sample"] for s in range(1, 7)] == [6 * s for s in range(1, 7)]
    for s in range(1, 7):  # same samples and noise: the losses agree up to float summation order
        assert math.isclose(a[s]["train/loss"], b[s]["train/loss"], rel_tol=1e-4, abs_tol=1e-7), s
    wa, wb = load_checkpoint(str(world["root"] / "train-straight")), load_checkpoint(str(resized))
    assert wa.step == wb.step == 6
    for name, t in wa.weights.items():
        assert float((wb.weights[name] - t).norm() / t.norm().clamp_min(1e-12)) < 1e-5, name
