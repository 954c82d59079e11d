"""Tracking: W&B mode selection, the local metrics.jsonl record, and a real offline W&B run resumed by id."""

import json

import pytest

from lens.tracking import JsonlTracker, NullTracker, make_tracker, wandb_mode


def test_mode_auto_is_online_only_with_an_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins, as W&B itself does
    assert wandb_mode("auto") == "disabled"


def test_disabled_tracker_still_writes_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = make_tracker("p", None, "run-a", "auto", {}, str(tmp_path))
    assert isinstance(tracker, JsonlTracker) and type(tracker.inner) is NullTracker
    tracker.log({"train/loss": 1.5}, step=3)
    tracker.log({"train/loss": 1.25}, step=4)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "train/loss": 1.5}, {"step": 4, "train/loss": 1.25}]


def test_a_remote_run_dir_is_uploaded_at_checkpoints_only_changed_files_and_survives_a_failure(tmp_path, caplog):
    """Logs and `step` events only append to scratch; a checkpoint (and the end) uploads what changed since the
    last upload; a failed upload is one warning, training goes on, and the next upload sends what was missed."""
    from lens.storage import LocalStorage

    class CountingStorage(LocalStorage):
        def __init__(self, root):
            super().__init__(root)
            self.writes, self.down = [], False

        def write_file(self, key, local_path):
            if self.down:
                raise OSError("S3 unreachable")
            self.writes.append(key)
            super().write_file(key, local_path)

    remote = CountingStorage(tmp_path / "run")
    tracker = JsonlTracker(str(tmp_path / "scratch"), NullTracker(), remote)
    (tmp_path / "scratch" / "wandb" / "run-x").mkdir(parents=True)
    (tmp_path / "scratch" / "wandb" / "run-x" / "run-x.wandb").write_bytes(b"w" * 10)
    for step in (1, 2):
        tracker.event("step", step=step)
        tracker.log({"train/loss": 1.0 / step}, step=step)
    assert remote.writes == []  # nothing uploaded per step or log interval
    tracker.event("checkpoint", step=2)
    assert sorted(remote.writes) == ["events.jsonl", "metrics.jsonl", "wandb/run-x/run-x.wandb"]
    remote.writes.clear()
    tracker.event("step", step=3)
    tracker.event("checkpoint", step=3)
    assert remote.writes == ["events.jsonl"]  # only the file that changed
    remote.writes.clear()
    remote.down = True
    tracker.log({"train/loss": 0.25}, step=4)
    with caplog.at_level("WARNING", logger="lens.tracking"):
        tracker.event("checkpoint", step=4)  # no exception: training goes on
    assert len(caplog.records) == 1 and "S3 unreachable" in caplog.records[0].message
    remote.down = False
    tracker.finish()
    assert sorted(remote.writes) == ["events.jsonl", "metrics.jsonl"]  # what the failure missed, retried
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (tmp_path / "scratch" / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_offline_wandb_run_uses_the_run_name_as_id_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    first = make_tracker("lens-test", None, "run-b", "auto", {"a": 1}, str(tmp_path))
    assert first.inner.run.id == "run-b"
    first.log({"train/loss": 2.0}, step=1)
    first.finish()
    again = make_tracker("lens-test", None, "run-b", "auto", {"a": 1}, str(tmp_path))
    assert again.inner.run.id == "run-b"
    again.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*-run-b"))


@pytest.mark.slow
def test_repeated_steps_after_a_resume_are_kept(tmp_path, monkeypatch):
    """A job resumed from step 3 after logging step 5 logs steps 4, 5 again: W&B's own step must keep rising
    (a step below it is dropped) while the trainer step is logged as the charts' x-axis."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    tracker = make_tracker("lens-test", None, "run-c", "auto", {}, str(tmp_path))
    run = tracker.inner.run
    wandb_steps, trainer_steps = [], []
    for step in [1, 2, 3, 4, 5, 4, 5, 6]:
        tracker.log({"train/loss": 1.0 / step}, step=step)
        wandb_steps.append(run.step)
        trainer_steps.append(run.summary["trainer/step"])
    assert wandb_steps == list(range(1, 9))  # W&B's own step: monotonic, every row kept, in order
    assert trainer_steps == [1, 2, 3, 4, 5, 4, 5, 6]  # the charts' x-axis: the trainer's step as logged
    assert run.summary["train/loss"] == pytest.approx(1 / 6)
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*-run-c/run-run-c.wandb"))
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 4, 5, 6]


@pytest.mark.slow
def test_a_remote_run_dir_keeps_metrics_events_and_the_wandb_folder_across_pods(tiny_files, tmp_path, monkeypatch):
    """run.dir on S3 (a real moto server): each `lens train` is a new pod with an empty scratch, yet run.dir ends
    with every step's metrics and events of both, and each pod's offline W&B folder (what `wandb sync` reads),
    even though both pods start in the same second (the second in W&B's folder name)."""
    import types

    import boto3
    import wandb.sdk.wandb_init
    import yaml
    from moto.server import ThreadedMotoServer

    from conftest import tiny_run_config
    from lens.cli import main

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = "http://{}:{}".format(*server.get_host_and_port())
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                            "AWS_CONFIG_FILE": str(tmp_path / "none"),
                            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "WANDB_MODE": "offline"}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="runs")
        monkeypatch.setattr(wandb.sdk.wandb_init, "time", types.SimpleNamespace(time=lambda: 1.8e9))  # the run start
        for pod, steps in (("pod-a", 2), ("pod-b", 4)):
            cfg = tiny_run_config(tiny_files, "remote-files", "s3://runs/remote-files",
                                  train={"max_steps": steps, "checkpoint_every": 2}, wandb={"mode": "offline"})
            cfg["storage"] = {"endpoint_url": endpoint}
            (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
            monkeypatch.setenv("LENS_SCRATCH", str(tmp_path / pod))  # the pod's cache volume: new each time
            assert main(["train", str(tmp_path / "config.yaml")]) == 0

        def text(key):
            return s3.get_object(Bucket="runs", Key=f"remote-files/{key}")["Body"].read().decode()

        rows = [json.loads(line) for line in text("metrics.jsonl").splitlines()]
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
        events = [json.loads(line) for line in text("events.jsonl").splitlines()]
        assert [(e["event"], e["step"]) for e in events if e["event"] != "step"] == [
            ("start", 0), ("checkpoint", 2), ("start", 2), ("checkpoint", 4)]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="remote-files/wandb/")["Contents"]]
        run_files = {k.split("/")[2] for k in keys if k.endswith("/run-remote-files.wandb")}
        assert len(run_files) == 2 and all(f.startswith("offline-run-") for f in run_files), keys  # one per pod
    finally:
        server.stop()
