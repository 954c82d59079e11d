"""Experiment tracking: W&B behind a tiny interface, with a no-op twin, so the loop never asks `if wandb:`."""

from __future__ import annotations

import json
import os


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self) -> None:
        pass


STEP_METRIC = "trainer/step"


class WandbTracker(NullTracker):
    """One W&B run per `run.name` (also its id), resumed on restart so a preempted job continues the same run.

    A resumed job repeats the steps after its checkpoint, which W&B's own step (monotonic, continued from the
    server on resume) would refuse. So W&B keeps its step, and charts use the logged `trainer/step` as x-axis."""

    def __init__(self, project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str):
        import wandb

        os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, id=run_name, name=run_name, resume="allow",
                              mode=mode, config=config, dir=dir)
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, STEP_METRIC: step})

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def finish(self) -> None:
        self.run.finish()


def wandb_mode(mode: str) -> str:
    """`auto`: online with an API key, offline otherwise (no network needed); WANDB_MODE in the env wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class JsonlTracker(NullTracker):
    """Appends every logged dict as one JSON line to `metrics.jsonl`: a local record W&B is not needed to read."""

    def __init__(self, dir: str, inner: NullTracker):
        os.makedirs(dir, exist_ok=True)
        self.path, self.inner = os.path.join(dir, "metrics.jsonl"), inner

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.inner.log(metrics, step)

    def summary(self, metrics: dict) -> None:
        self.inner.summary(metrics)

    def finish(self) -> None:
        self.inner.finish()


def run_files_dir(run_dir: str) -> str:
    """Where W&B and metrics.jsonl write their files: the run dir when it is local, else ./wandb-local."""
    return "wandb-local" if "://" in run_dir else run_dir


def make_tracker(project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str,
                 jsonl: bool = True) -> NullTracker:
    """W&B (unless disabled), behind a local metrics.jsonl in `dir` when `jsonl`."""
    mode = wandb_mode(mode)
    inner = NullTracker() if mode == "disabled" else WandbTracker(project, entity, run_name, mode, config, dir)
    return JsonlTracker(dir, inner) if jsonl else inner
