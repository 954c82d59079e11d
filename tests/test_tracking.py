"""Tracking: W&B mode selection, the local metrics.jsonl record, and a real offline W&B run resumed by id."""

import json

import pytest

from conftest import wandb_records
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
    for step in [1, 2, 3, 4, 5, 4, 5, 6]:
        tracker.log({"train/loss": 1.0 / step}, step=step)
    assert run.step == 8  # every row kept, in order
    assert run.summary["trainer/step"] == 6 and run.summary["train/loss"] == pytest.approx(1 / 6)
    tracker.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*-run-c/run-run-c.wandb")
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == list(range(8))  # W&B's own step: monotonic
    assert [h["trainer/step"] for h in history] == [1, 2, 3, 4, 5, 4, 5, 6]
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 4, 5, 6]
