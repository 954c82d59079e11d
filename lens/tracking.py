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


class WandbTracker(NullTracker):
    """One W&B run per `run.name` (also its id), resumed on restart so a preempted job continues the same run."""

    def __init__(self, project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str):
        import wandb

        os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, id=run_name, name=run_name, resume="allow",
                              mode=mode, config=config, dir=dir)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

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


def make_tracker(project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str) -> NullTracker:
    """W&B (unless disabled) behind a local metrics.jsonl in `dir`."""
    mode = wandb_mode(mode)
    inner = NullTracker() if mode == "disabled" else WandbTracker(project, entity, run_name, mode, config, dir)
    return JsonlTracker(dir, inner)
