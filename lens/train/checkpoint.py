"""Checkpoints: the only module that knows their layout.

A run directory (local or ``s3://``) holds::

    checkpoints/
      step-00000200/
        __0_0.distcp      rank 0's shards of the tensors (torch.distributed.checkpoint, "DCP"): each rank writes
        __1_0.distcp      only what it owns (its FSDP shards; replicated tensors are spread over the ranks)
        .metadata         DCP's index of every shard, written by rank 0 after every rank's data
        rng.pt            python, numpy, torch CPU and CUDA RNG states (rank 0's; see rng_state())
        state.json        {"step": 200, ...trainer state: data cursor, W&B run id}
        config.yaml       the resolved run config
        COMMITTED         written after .metadata: JSON naming the step, the world size and every file
      unloadable/step-00000300/   a checkpoint a resume found it could not load, moved aside (never deleted);
                                  REASON says why
      latest              text: the name of the newest committed folder

The tensors are one DCP state dict, ``{"model": {name: tensor}, "optimizer": {...}}`` (see training_state()),
keyed by parameter names, so a checkpoint saved at one world size loads at any other: DCP reshards on load.

Every object is published atomically, but a save is many objects and a writer can die between any two. So a folder
counts only once its ``COMMITTED`` marker exists; ``latest`` is a hint that is followed when it names a committed
folder and otherwise replaced by the newest committed folder, and it is moved with a conditional write, never back
to an older step (a save that a restarted generation overtook cannot rewind it). Uncommitted folders are leftovers
of a killed save: readers ignore them and the next save deletes them. A committed checkpoint that does not load
(a truncated shard, a garbled marker) is reported in one line and skipped: resume falls back to the newest one
before it that loads (:meth:`CheckpointManager.resume`). Storage that fails to serve a checkpoint (an outage,
refused credentials) says nothing about the checkpoint: that error propagates and the checkpoint stays in place.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import posixpath
import random
import re
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from lens.errors import InputError, RetryableError
from lens.storage import Storage, _classify, open_storage

logger = logging.getLogger(__name__)
# What reading or applying a damaged checkpoint raises: a file missing from a committed folder, truncated or garbled
# (JSON, pickle, torch's zip format, DCP's metadata: DCP turns a metadata read failure into an AssertionError), or
# state that does not fit the model and optimizer (KeyError, RuntimeError, ValueError).
DAMAGE_ERRORS = (ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError, RuntimeError,
                 AssertionError, FileNotFoundError)
# DCP warns at every call without a process group that it assumes one process (also from its upload thread): that is
# the intent here (no_dist is passed explicitly).
warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")

CHECKPOINTS = "checkpoints"
LATEST = f"{CHECKPOINTS}/latest"
UNLOADABLE = f"{CHECKPOINTS}/unloadable"
METADATA = ".metadata"  # DCP's index, written last of DCP's files
RNG = "rng.pt"
STATE = "state.json"
CONFIG = "config.yaml"
COMMITTED = "COMMITTED"
REASON = "REASON"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# Upload threads per rank (DCP: one file per thread). Measured by bench/checkpoint.py: see the README.
WRITE_THREADS = 4


def alone(ok: bool) -> bool:
    """`all_ok` of a single process: nothing to agree with."""
    return ok


def step_dirname(step: int) -> str:
    """``step-00000123``: zero-padded so that names sort by step up to 10**8 steps."""
    if step < 0:
        raise ValueError(f"checkpoint step {step} is negative; expected a step count >= 0")
    return f"step-{step:08d}"


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # The frozen model is not ours to save: only trainable parameters, their optimizer state and buffers.
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _without_frozen(model: torch.nn.Module, state: dict) -> dict:
    """`ignore_frozen_params` drops a frozen parameter under its first name only: the orig model shared by the
    decoder and the encoder would still be saved as `encoder.lm.*`. Drop every alias."""
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The tensors a checkpoint holds, as a DCP state dict: this rank's shards (FSDP2 DTensors) or its replicas
    (plain and DDP modules), keyed by parameter names whatever the wrapping. Views of the live tensors: nothing is
    gathered or copied."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    return {"model": _without_frozen(model, model_state), "optimizer": optimizer_state}


def apply_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict) -> None:
    """Inverse of :func:`training_state`, after a :meth:`Checkpoint.load_into` filled ``tensors``."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    # Not strict: the frozen parameters are absent by design. Every trainable one is there, as dcp.load filled
    # exactly the keys training_state() listed.
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"],
                   options=_options(strict=False))


def _only_saved_optimizer_state(tensors: dict, saved: dict) -> None:
    """Drop from a `training_state` template the optimizer state of the parameters the checkpoint (DCP's flat keys,
    `saved`) has none for: those no gradient reached before the save (a trainable encoder copy's blocks past
    encoder.layer). A fresh optimizer's template has state for every parameter (DCP initialises it); loading that
    whole would fail on their missing keys, and `apply_training_state` then leaves them without state, as saved.
    A checkpoint without any optimizer state is left to fail: every save follows a step that reached something."""
    state = tensors.get("optimizer", {}).get("state", {})
    prefix = "optimizer.state."
    have = {key[len(prefix):].rsplit(".", 1)[0] for key in saved if key.startswith(prefix)}
    for name in [name for name in state if name not in have] if have else ():
        del state[name]


class _SavedStatePlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, fitting the optimizer state to load to the checkpoint's index first."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        _only_saved_optimizer_state(state_dict, metadata.state_dict_metadata)
        super().set_up_planner(state_dict, metadata, is_coordinator)


def model_state(model: torch.nn.Module) -> dict:
    """The model half of :func:`training_state` (for inference: no optimizer)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {"model": _without_frozen(model, get_model_state_dict(model, options=_options()))}


def apply_model_state(model: torch.nn.Module, tensors: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, tensors["model"], options=_options(strict=False))


def _no_dist() -> bool:
    """No process group (one process reading or writing alone): DCP then runs without collectives."""
    return not torch.distributed.is_initialized()


def one_line(e: BaseException) -> str:
    """An exception as one short line; DCP's CheckpointException is unwrapped to the first failing rank's error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = sorted(failures.items())[0]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped  # (exception, its stack)
        return f"rank {rank}: {one_line(inner)}"
    text = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class DamagedCheckpoint(InputError):
    """A committed folder whose marker this version cannot read: bad input when named alone, skipped on resume."""


def is_damage(e: BaseException) -> bool:
    """Whether a failure to load a checkpoint says the checkpoint is damaged. Storage that failed to serve it (an
    outage that outlasted its retries, refused credentials, a local I/O error), a lost peer or a config that does not
    match the run are not damage: moving the checkpoint aside would lose a good one."""
    if isinstance(e, CheckpointException):  # DCP's gathering of every rank's failure: damage only if all are
        return all(is_damage(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
                   for wrapped in e.failures.values())
    if isinstance(e, InputError):
        return isinstance(e, DamagedCheckpoint)
    if _classify(e)[0] or isinstance(e, torch.distributed.DistError):
        return False
    return isinstance(e, DAMAGE_ERRORS)


@dataclass
class Checkpoint:
    """One committed checkpoint: its small state read into memory, its tensors read on demand."""

    step: int
    state: dict
    """The small trainer state passed to ``save`` (data cursor, W&B run id, ...), through JSON."""
    rng: dict
    """RNG states as captured by :func:`rng_state`; pass to :func:`set_rng_state`."""
    config_yaml: str
    """The resolved run config, as text."""
    name: str
    """The step folder's name, e.g. ``step-00000123``."""
    uri: str
    """Where the step folder lives."""
    folder: Storage = field(repr=False)
    files: list[str] = field(repr=False)
    """The files its marker names."""
    _whole: dict | None = field(default=None, repr=False)

    def load_into(self, tensors: dict, process_group=None) -> None:
        """Fill ``tensors`` (a DCP state dict such as :func:`training_state`'s, or a part of one) in place. Each
        rank reads only the shards it holds, at any world size. Collective when a process group is up."""
        try:
            dcp.load(tensors, storage_reader=self.folder.dcp_reader(), planner=_SavedStatePlanner(),
                     process_group=process_group, no_dist=_no_dist())
        except (Exception, CheckpointException) as e:
            # DCP's S3 reader reports a missing file like an outage: the storage layer tells them apart.
            missing = [] if is_damage(e) else sorted(set(self.files) - set(self.folder.list()))
            if missing:
                raise FileNotFoundError(f"no object at {self.folder.uri(missing[0])} ({len(missing)} of the files "
                                        f"{COMMITTED} names are missing)") from None
            raise

    def read(self) -> dict:
        """The whole state dict in this process, unsharded, on CPU (for inspection and tests; training loads
        with :meth:`load_into`)."""
        if self._whole is None:
            # DCP's loader of a checkpoint into an empty dict (as dcp_to_torch_save does): not sharded, no group.
            from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
            from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

            whole: dict = {}
            _load_state_dict(whole, storage_reader=self.folder.dcp_reader(), planner=_EmptyStateDictLoadPlanner(),
                             no_dist=True)
            self._whole = whole
        return self._whole

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by name, whole, bitwise as saved."""
        return self.read()["model"]

    @property
    def optimizer_state(self) -> dict:
        """The optimizer state as saved (keyed by parameter names), whole."""
        return self.read()["optimizer"]


class PendingSave:
    """A save in progress: with ``train.async_checkpoint`` its tensors are still uploading. Rank 0 commits it (the
    small objects, the marker, the pointer) in the upload's own thread as soon as DCP's metadata is written, so the
    training loop only learns the outcome in :meth:`finish`."""

    def __init__(self, manager: CheckpointManager, name: str, future, small: dict[str, bytes] | None, rank: int,
                 world: int, all_ok: Callable[[bool], bool], started: float):
        self.manager, self.name, self.future, self.small = manager, name, future, small
        self.step = _step_of(name)
        self.rank, self.world, self.all_ok = rank, world, all_ok
        self.started = started
        """``time.perf_counter()`` when the save began."""
        self.seconds: float | None = None
        """From ``started`` to the end of this rank's part (rank 0: the commit), stamped as it ends: the time the
        save took, not the time until the training loop looked."""
        self._error: BaseException | None = None
        self._ended = threading.Event()
        if future is not None:
            future.add_done_callback(lambda _: self._end())
        else:
            self._end()

    def _end(self) -> None:
        """This rank's part, once its upload is done (in the upload's thread): rank 0 commits."""
        try:
            if self.future is not None:
                self.future.result()
            if self.rank == 0:
                self.manager._commit(self.name, self.small, self.world)
        except BaseException as e:  # noqa: BLE001 - raised on every rank by finish()
            self._error = e
        finally:
            self.seconds = time.perf_counter() - self.started
            self._ended.set()

    def done(self) -> bool:
        """Whether this rank's part is over (rank 0: committed or failed); never blocks."""
        return self._ended.is_set()

    def finish(self) -> str:
        """Wait for this rank's part, then raise on every rank if any rank's failed; returns the folder name."""
        self._ended.wait()
        error = self._error
        if not self.all_ok(error is None):
            if error is None:
                raise OSError(f"another rank failed to save {self.manager.storage.uri(f'{CHECKPOINTS}/{self.name}')}"
                              f"; not committed")
            if isinstance(error, CheckpointException):
                raise _save_failed(self.manager, self.name, error) from error
            raise error
        return self.name


class CheckpointManager:
    """Saves checkpoints of one run directory, keeps the newest ``keep``, and finds the one to resume from.

    ``save`` is collective over the ranks of one job: no other job may write under ``checkpoints/`` at the same time.
    """

    def __init__(self, storage: Storage, keep: int = 3, write_threads: int = WRITE_THREADS):
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep} is invalid; expected at least 1 (the checkpoint just saved)")
        self.storage, self.keep, self.write_threads = storage, keep, write_threads
        self.last_tensor_bytes = 0  # tensor bytes this rank held in the last save (its shards, or its replicas)
        self._staging = None  # see _stager()

    def save(self, step: int, tensors: dict, state: dict, config_yaml: str, *, rank: int = 0, world: int = 1,
             all_ok: Callable[[bool], bool] = alone, process_group=None) -> str:
        """Write a checkpoint of ``step``, point ``latest`` at it, drop old ones; returns the folder name.

        Every rank calls this with its ``tensors`` (:func:`training_state`); each writes what it owns, rank 0 also
        the small objects, the marker and the pointer. ``all_ok(ok)`` must return True on every rank iff ``ok`` was
        True on every rank (an all-reduce); DCP's own collectives run on ``process_group``. The RNG states are
        captured here, at the call (rank 0's). A step that is already committed is never overwritten (the run is
        deterministic, so it holds this same state): only ``latest`` is pointed at it again.
        """
        return self.start_save(step, tensors, state, config_yaml, rank=rank, world=world, all_ok=all_ok,
                               process_group=process_group, asynchronous=False).finish()

    def start_save(self, step: int, tensors: dict, state: dict, config_yaml: str, *, rank: int = 0, world: int = 1,
                   all_ok: Callable[[bool], bool] = alone, process_group=None,
                   asynchronous: bool = True) -> PendingSave:
        """``save`` that returns once this rank's tensors are copied to host memory (``dcp.async_save``); the
        upload goes on in a thread and the checkpoint counts once :meth:`PendingSave.finish` committed it.
        ``process_group`` must not be the one training's collectives use (they would interleave). With
        ``asynchronous=False`` it returns once the upload is done (and rank 0 committed it)."""
        started = time.perf_counter()
        if "step" in state:
            raise ValueError("trainer state has a key 'step'; the checkpoint stores the step itself, pass it as step=")
        name = step_dirname(step)
        folder_key = f"{CHECKPOINTS}/{name}"
        folder = self.storage.sub(folder_key)
        if folder.exists(COMMITTED):
            logger.info("checkpoint %s is already committed; not overwriting it", folder.uri())
            return PendingSave(self, name, None, None, rank, world, all_ok, started)
        # Serialized now (the RNG states of this moment), written after the tensors, just before the marker.
        small = {RNG: _torch_bytes(rng_state()), STATE: json.dumps({"step": step, **state}, indent=1).encode(),
                 CONFIG: config_yaml.encode()} if rank == 0 else None
        error = None
        if rank == 0:
            try:
                self.storage.delete_prefix(folder_key)  # leftovers of a killed attempt
            except Exception as e:  # noqa: BLE001 - reported to every rank below, then re-raised
                error = e
        if not all_ok(error is None):  # nobody writes before the leftovers are gone
            if error is not None:
                raise error
            raise OSError(f"rank 0 failed to clear {folder.uri()}; not saving it")
        self.last_tensor_bytes = _local_bytes(tensors)
        try:
            if asynchronous:
                result = dcp.async_save(tensors, storage_writer=folder.dcp_writer(self.write_threads),
                                        process_group=process_group, no_dist=_no_dist(), async_stager=self._stager())
            else:
                result = dcp.save(tensors, storage_writer=folder.dcp_writer(self.write_threads),
                                  process_group=process_group, no_dist=_no_dist())
        except CheckpointException as e:  # every rank gets it: DCP gathers the ranks' write results
            raise _save_failed(self, name, e) from e
        future = getattr(result, "upload_completion", result) if asynchronous else None
        return PendingSave(self, name, future, small, rank, world, all_ok, started)

    def _stager(self):
        """The host copy async saves upload from, kept between saves: later saves only copy into it (no
        allocation, no page faults), which is most of the time a step is blocked. Costs this rank's share of the
        state in host memory for the run's lifetime."""
        if self._staging is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            gpu = torch.cuda.is_available()  # pinned host memory speeds copies from a GPU; it needs one
            self._staging = DefaultStager(StagingOptions(use_pinned_memory=gpu, use_shared_memory=False,
                                                         use_async_staging=False, use_non_blocking_copy=False))
        return self._staging

    def _commit(self, name: str, small: dict[str, bytes] | None, world: int) -> None:
        """Rank 0, after every rank's tensors and DCP's metadata are stored: the small objects, the marker, then the
        pointer. ``small`` is None for a step that was committed already (only the pointer moves)."""
        folder = self.storage.sub(f"{CHECKPOINTS}/{name}")
        if small is not None:
            for key, data in small.items():
                folder.write_bytes(key, data)
            files = folder.list()
            if METADATA not in files:
                raise OSError(f"{folder.uri(METADATA)} is missing after the save; not committing it")
            folder.write_bytes(COMMITTED, json.dumps({"step": _step_of(name), "world": world, "files": files}).encode())
            if not folder.exists(COMMITTED):
                raise OSError(f"wrote {folder.uri(COMMITTED)} but it does not exist; not pointing {LATEST} at it")
            logger.info("saved checkpoint %s (%d files from %d ranks)", folder.uri(), len(files), world)
        self._collect_garbage(latest=self._point_latest(name))

    def _point_latest(self, name: str) -> str:
        """Move ``latest`` to ``name`` by compare-and-swap, unless it already names a newer committed step; returns
        what ``latest`` names now."""
        for _ in range(5):
            try:
                current, version = self.storage.read_versioned(LATEST)
                current = current.decode().strip()
            except FileNotFoundError:
                current, version = None, None
            if current and _STEP_DIR.match(current) and _step_of(current) > _step_of(name) and \
                    self.storage.exists(f"{CHECKPOINTS}/{current}/{COMMITTED}"):
                logger.warning("%s names %s, newer than %s: leaving it", self.storage.uri(LATEST), current, name)
                return current
            if self.storage.write_if(LATEST, name.encode(), version):
                return name
        raise OSError(f"could not update {self.storage.uri(LATEST)}: another writer keeps changing it")

    def load_latest(self) -> Checkpoint | None:
        """The checkpoint ``latest`` leads to (its small state; tensors on demand), or ``None`` when the run has no
        committed checkpoint. Resume uses :meth:`resume`, which also falls back past checkpoints that do not load."""
        names = self._candidates()
        return _read(self.storage.sub(f"{CHECKPOINTS}/{names[0]}"), names[0]) if names else None

    def resume(self, load: Callable[[Checkpoint], None], rank: int = 0, all_ok: Callable[[bool], bool] = alone,
               move_aside: bool = True) -> Checkpoint | None:
        """The newest committed checkpoint that loads, after ``load(checkpoint)`` loaded it; ``None`` when there is
        no committed checkpoint. Collective: every rank calls it and all agree on the checkpoint.

        A damaged checkpoint (a missing or truncated file, an unreadable marker or metadata, an optimizer state
        that does not fit: :func:`is_damage`) is reported in one line and skipped; with ``move_aside`` rank 0 moves
        it to ``checkpoints/unloadable/`` (a later save of that step needs the name; nothing is deleted). Any other
        failure on any rank is raised on every rank and moves nothing: an ``InputError`` as it is (the config does
        not match the run, refused credentials), anything else (storage that did not answer) as a
        ``RetryableError``, so the next start tries the same checkpoint again.
        """
        names, skipped = self._candidates(), []
        for name in names:
            folder = self.storage.sub(f"{CHECKPOINTS}/{name}")
            checkpoint, why = _attempt(all_ok, folder.uri(), _read, folder, name)
            if why is None:
                _, why = _attempt(all_ok, folder.uri(), load, checkpoint)
            if why is None:
                if skipped:
                    logger.warning("resuming from %s: the newest committed checkpoint that loads (skipped %s)",
                                   folder.uri(), ", ".join(skipped))
                return checkpoint
            logger.error("checkpoint %s does not load (%s); trying the one before it", folder.uri(), why)
            skipped.append(name)
            error = None
            if move_aside and rank == 0:
                try:
                    self._move_aside(name, why)
                except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
                    error = e
            if not all_ok(error is None):  # nobody looks at the next one while rank 0 moves this one, nor waits
                if error is not None:
                    raise error
                raise OSError(f"rank 0 failed to move {folder.uri()} aside; see its log")
        if skipped:
            raise InputError(f"none of the committed checkpoints in {self.storage.uri(CHECKPOINTS)} loads (skipped "
                             f"{', '.join(skipped)}; see the lines above); fix them, or use a new run.dir")
        return None

    def _move_aside(self, name: str, why: str) -> None:
        taken = set(self.storage.list_dirs(UNLOADABLE))  # earlier broken copies of this step stay as they are
        names = [name] + [f"{name}-{n}" for n in range(1, len(taken) + 1)]  # len(taken) + 1 names: one is free
        target = f"{UNLOADABLE}/{next(n for n in names if n not in taken)}"
        self.storage.move_prefix(f"{CHECKPOINTS}/{name}", target)
        self.storage.write_bytes(f"{target}/{REASON}", f"{why}\n".encode())
        logger.warning("moved %s to %s (kept for inspection; move it back to retry it)",
                       self.storage.uri(f"{CHECKPOINTS}/{name}"), self.storage.uri(target))

    def committed(self) -> list[str]:
        """Names of the committed step folders, oldest first."""
        return [name for name in self._step_dirs() if self.storage.exists(f"{CHECKPOINTS}/{name}/{COMMITTED}")]

    def _step_dirs(self) -> list[str]:
        """Names of all step folders, committed or not, oldest first; other folders are not ours."""
        names = [name for name in self.storage.list_dirs(CHECKPOINTS) if _STEP_DIR.match(name)]
        return sorted(names, key=_step_of)

    def _candidates(self) -> list[str]:
        """Committed folders to resume from, best first: the one ``latest`` names (else the newest), then the older
        ones, newest first."""
        try:
            name = self.storage.read_bytes(LATEST).decode().strip()
        except FileNotFoundError:
            name = None
        committed = self.committed()
        if name is not None and name not in committed:
            fallback = committed[-1] if committed else "nothing"
            logger.warning("%s names %r, not a committed checkpoint; using %s", self.storage.uri(LATEST), name,
                           fallback)
            name = None
        if name is None:
            return committed[::-1]
        return [name] + [n for n in committed[::-1] if _step_of(n) < _step_of(name)]

    def _collect_garbage(self, latest: str) -> None:
        """Delete uncommitted folders and committed ones beyond the newest ``keep``, never ``latest``."""
        committed = self.committed()
        keep = set(committed[-self.keep :]) | {latest}
        for name in self._step_dirs():
            if name in keep:
                continue
            key = f"{CHECKPOINTS}/{name}"
            logger.info("deleting checkpoint folder %s", self.storage.uri(key))
            # The marker goes first: a deletion cut short must leave an uncommitted folder, never a committed one
            # with missing files.
            self.storage.delete(f"{key}/{COMMITTED}")
            self.storage.delete_prefix(key)


def _save_failed(manager: CheckpointManager, name: str, e: CheckpointException) -> OSError:
    """DCP's error of a save (a BaseException gathering every rank's failure), as one line every rank raises."""
    return OSError(f"saving checkpoint {manager.storage.uri(f'{CHECKPOINTS}/{name}')} failed ({one_line(e)}); "
                   f"not committing it")


def _step_of(name: str) -> int:
    return int(_STEP_DIR.match(name).group(1))


def _attempt(all_ok: Callable[[bool], bool], uri: str, fn: Callable, *args) -> tuple[object, str | None]:
    """``fn(*args)`` on every rank, collectively: (its result, None) when it worked on every rank, else (None, why
    the checkpoint at ``uri`` is damaged). A failure that is not damage on any rank is raised on every rank (no rank
    waits in a collective for one that left)."""
    result, why, fault = None, None, None
    try:
        result = fn(*args)
    except (Exception, CheckpointException) as e:  # CheckpointException: DCP's gathering of the ranks' failures
        if is_damage(e):
            why = one_line(e)
        else:
            fault = e
    if not all_ok(fault is None):
        _raise_fault(fault, uri)
    if not all_ok(why is None):
        return None, why or "another rank could not load it"
    return result, None


def _raise_fault(e: BaseException | None, uri: str) -> NoReturn:
    """Raise a failure to load ``uri`` that is not damage (``None``: another rank's): bad input as it is, anything
    else as retryable; the checkpoint stays where it is for the next start."""
    if isinstance(e, (InputError, RetryableError)):
        raise e
    cause = one_line(e) if e is not None else "on another rank; see its log"
    raise RetryableError(f"could not read checkpoint {uri} ({cause}); it is not damaged: it stays, and the next "
                         f"start tries it again") from e


def load_checkpoint(uri: str, endpoint_url: str | None = None,
                    load: Callable[[Checkpoint], None] | None = None) -> Checkpoint:
    """The checkpoint at ``uri``: a run directory (its latest committed checkpoint) or one step folder.

    With ``load(checkpoint)`` (which reads what the caller needs, e.g. the weights into a model), a run directory
    gives the newest committed checkpoint that loads, skipping (and reporting) those that do not, as a resume does;
    nothing is moved. Raises ``InputError`` naming the URI and what is there when it holds no committed checkpoint,
    or when the one step folder named does not load.
    """
    storage = open_storage(uri, endpoint_url)
    if storage.exists(COMMITTED):
        checkpoint = _read(storage, posixpath.basename(storage.uri()))
        if load is not None:
            try:
                load(checkpoint)
            except (Exception, CheckpointException) as e:  # as in _attempt
                if not is_damage(e):
                    _raise_fault(e, storage.uri())
                raise InputError(f"checkpoint {storage.uri()} does not load ({one_line(e)}); pass the run directory "
                                 f"or the checkpoint folder before it") from None
        return checkpoint
    if storage.exists(STATE) or storage.exists(METADATA) or \
            any(k.endswith(".distcp") and "/" not in k for k in storage.list()):
        raise InputError(f"{storage.uri()} is an incomplete checkpoint: it has no {COMMITTED} marker (its save was "
                         f"interrupted); holds {_describe(storage)}")
    manager = CheckpointManager(storage)
    if storage.list_dirs(CHECKPOINTS) or storage.exists(LATEST):
        checkpoint = manager.load_latest() if load is None else manager.resume(load, move_aside=False)
        if checkpoint is None:
            raise InputError(f"run directory {storage.uri()} has no committed checkpoint; {CHECKPOINTS}/ holds "
                             f"{_describe(storage.sub(CHECKPOINTS))}")
        return checkpoint
    raise InputError(f"{storage.uri()} is neither a run directory (with {CHECKPOINTS}/) nor a checkpoint folder "
                     f"(with {COMMITTED}); it holds {_describe(storage)}")


def _describe(storage: Storage, limit: int = 5) -> str:
    keys = storage.list()
    if not keys:
        return "nothing"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read(folder: Storage, name: str) -> Checkpoint:
    """The small state of one committed step folder; damage raises one of DAMAGE_ERRORS or DamagedCheckpoint."""
    try:
        marker = json.loads(folder.read_bytes(COMMITTED))
        files = marker["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{folder.uri(COMMITTED)} is unreadable ({one_line(e)}): not a marker this version "
                                f"wrote") from None
    if METADATA not in files:
        raise DamagedCheckpoint(f"{folder.uri(COMMITTED)} names no {METADATA}: not a checkpoint this version can "
                                f"read")
    state = json.loads(folder.read_bytes(STATE))
    return Checkpoint(
        step=state.pop("step"),
        state=state,
        rng=torch.load(io.BytesIO(folder.read_bytes(RNG)), weights_only=True),
        config_yaml=folder.read_bytes(CONFIG).decode(),
        name=name,
        uri=folder.uri(),
        folder=folder,
        files=files,
    )


def _local_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: this rank's shard
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_local_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_local_bytes(v) for v in obj)
    return 0


def _torch_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def rng_state() -> dict:
    """Every global RNG a training step may draw from: python, numpy, torch CPU and each CUDA device.

    Only plain types and tensors, so ``torch.load(..., weights_only=True)`` reads it back.
    """
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured. CUDA states are restored when this process sees CUDA devices."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy_state["bit_generator"],
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # A resized job may see fewer or more devices; sampling randomness is counter-based (lens/rng.py), so only
        # the devices both runs have can and need to continue their streams.
        saved, seen = len(state["cuda"]), torch.cuda.device_count()
        if saved != seen:
            logger.warning("checkpoint has RNG states of %d CUDA devices, this process sees %d; restoring the first %d",
                           saved, seen, min(saved, seen))
        for device, cuda_state in enumerate(state["cuda"][:seen]):
            torch.cuda.set_rng_state(cuda_state, device)
