"""Experiment tracking: W&B behind a tiny interface, with a no-op twin, so the loop never asks `if wandb:`."""

from __future__ import annotations

import json
import logging
import os
import secrets
import time

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def event(self, kind: str, **fields) -> None:
        pass

    def finish(self) -> None:
        pass


STEP_METRIC = "trainer/step"


class WandbTracker(NullTracker):
    """One W&B run per `run.name` (also its id), resumed on restart so a preempted job continues the same run.

    A resumed job repeats the steps after its checkpoint, which W&B's own step (monotonic, continued from the
    server on resume) would refuse. So W&B keeps its step, and charts use the logged `trainer/step` as x-axis.

    `folder_suffix` ends the name of the run's local folder (`offline-run-<start second>-<id>-<suffix>`). W&B
    itself only avoids the folders it sees on local disk; a pod uploading into a shared run.dir needs a suffix of its
    own, or two pods that start in the same second would write one remote folder, the second's history replacing
    the first's."""

    def __init__(self, project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str,
                 folder_suffix: str = ""):
        import wandb

        os.makedirs(dir, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, id=run_name, name=run_name, resume="allow",
                              mode=mode, config=config, dir=dir,
                              settings=wandb.Settings(x_sync_dir_suffix=folder_suffix))
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({**metrics, STEP_METRIC: step})

    def summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows), STEP_METRIC: step})

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
    """Appends every logged dict as one JSON line to `metrics.jsonl`, and the trainer's events (`start`, `step`,
    `checkpoint`, `preemption`: what tools react to, instead of log text) to `events.jsonl`: local records W&B is not
    needed to read.

    With `remote` (the storage of a remote run.dir; `dir` is then local scratch), nothing is lost with the pod: a
    fresh scratch starts from run.dir's copies, and at every checkpoint commit and at the end (preemption included)
    both files and the W&B run folder (`dir/wandb`, so `wandb sync` works on it later) are uploaded there, each file
    only if it changed. Logs and other events (`step`, every step) only append locally: an upload per step or log
    interval would resend the growing files each time, on rank 0's training path."""

    FILES = ("metrics.jsonl", "events.jsonl")

    def __init__(self, dir: str, inner: NullTracker, remote=None):
        os.makedirs(dir, exist_ok=True)
        self.dir, self.inner, self.remote = dir, inner, remote
        self.uploaded: dict[str, tuple[int, int]] = {}  # key -> (size, mtime) of the local file last uploaded
        self.path, self.events_path = (os.path.join(dir, name) for name in self.FILES)
        if remote is not None:  # a restarted pod's empty scratch continues run.dir's records
            for name in self.FILES:
                if not os.path.exists(os.path.join(dir, name)) and remote.exists(name):
                    remote.read_file(name, os.path.join(dir, name))

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.inner.log(metrics, step)

    def event(self, kind: str, **fields) -> None:
        with open(self.events_path, "a") as f:
            f.write(json.dumps({"event": kind, "time": time.time(), **fields}) + "\n")
        if kind == "checkpoint":
            self.upload()

    def upload(self) -> None:
        """Copy the records and W&B run files changed since their last upload (size or mtime) to the remote run.dir.
        A failure is one warning, not the end of the run: what did not go is retried at the next upload."""
        if self.remote is None:
            return
        root = os.path.join(self.dir, "wandb")
        paths = [os.path.join(self.dir, name) for name in self.FILES]
        paths += [os.path.join(folder, name) for folder, _, files in os.walk(root) for name in files]
        for path in paths:
            if os.path.islink(path):  # latest-run, debug.log: W&B's shortcuts to files uploaded anyway
                continue
            key = os.path.relpath(path, self.dir).replace(os.sep, "/")
            try:
                stat = os.stat(path)
                version = (stat.st_size, stat.st_mtime_ns)
                if self.uploaded.get(key) != version:
                    self.remote.write_file(key, path)
                    self.uploaded[key] = version
            except FileNotFoundError:  # not written yet, or a temporary file W&B removed meanwhile
                pass
            except Exception as e:  # S3 down or refusing: the records wait in scratch, training goes on
                log.warning("uploading the run records to %s failed (%s: %s); retried at the next upload",
                            self.remote.uri(), type(e).__name__, e)
                return

    def summary(self, metrics: dict) -> None:
        self.inner.summary(metrics)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, key: [dict(zip(columns, row)) for row in rows]}) + "\n")
        self.inner.table(key, columns, rows, step)

    def finish(self) -> None:
        self.inner.finish()
        self.upload()


def run_files_dir(run_dir: str) -> str:
    """Where W&B, metrics.jsonl and events.jsonl are written: the run dir when it is local, else local scratch
    (`$LENS_SCRATCH`, which the chart puts on its cache volume; default ./wandb-local) copied to run.dir."""
    return (os.environ.get("LENS_SCRATCH") or "wandb-local") if "://" in run_dir else run_dir


def make_tracker(project: str, entity: str | None, run_name: str, mode: str, config: dict, dir: str,
                 jsonl: bool = True, remote=None) -> NullTracker:
    """W&B (unless disabled), behind a local metrics.jsonl in `dir` when `jsonl`, uploaded to `remote` (a Storage)
    when given (then the W&B folder's name carries a suffix unique to this process: see WandbTracker)."""
    mode = wandb_mode(mode)
    suffix = secrets.token_hex(3) if remote is not None else ""
    inner = NullTracker() if mode == "disabled" else WandbTracker(project, entity, run_name, mode, config, dir, suffix)
    return JsonlTracker(dir, inner, remote) if jsonl else inner
