"""Checkpoints: the only module that knows their layout.

A run directory (local or ``s3://``) holds::

    checkpoints/
      step-00000200/
        tensors-00000-of-00002.safetensors   rank 0's share of the tensors: trainable weights (fp32 masters) as
        tensors-00001-of-00002.safetensors   "weights/<name>", optimizer tensors as "optimizer/<path>"
        optimizer.pt          optimizer.state_dict() with its tensors replaced by references into the parts
        rng.pt                python, numpy, torch CPU and CUDA RNG states (see rng_state())
        state.json            {"step": 200, ...trainer state: data cursor, scheduler, W&B run id}
        config.yaml           the resolved run config
        COMMITTED             written after every rank confirmed its part: JSON naming each part and its size
      latest                  text: the name of the newest saved folder, written last

Saving is collective: every rank holds the same (replicated) state and uploads a disjoint share of the tensors, so a
save takes about 1/world of the time one writer would. Every object is published atomically by ``lens.storage``,
but a save is many objects and a writer can die between any two. So a folder counts only once its ``COMMITTED``
marker exists; ``latest`` is a hint that is followed when it names a committed folder and otherwise replaced by the
newest committed folder, and it is moved with a conditional write, never back to an older step (a save that a
restarted generation overtook cannot rewind it). Uncommitted folders are leftovers of a killed save: readers ignore
them and the next save deletes them. Resume, ``lens eval`` and ``lens explain`` all read through
:func:`load_checkpoint` / :meth:`CheckpointManager.load_latest`.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import safetensors.torch
import torch

from lens.errors import InputError
from lens.storage import Storage, open_storage

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = f"{CHECKPOINTS}/latest"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "state.json"
CONFIG = "config.yaml"
COMMITTED = "COMMITTED"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TENSOR_REF = "tensor:"  # in optimizer.pt, a string "tensor:optimizer/state/0/exp_avg" stands for that tensor


def part_name(rank: int, world: int) -> str:
    return f"tensors-{rank:05d}-of-{world:05d}.safetensors"


def alone(ok: bool) -> bool:
    """`all_ok` of a single process: nothing to agree with."""
    return ok


def step_dirname(step: int) -> str:
    """``step-00000123``: zero-padded so that names sort by step up to 10**8 steps."""
    if step < 0:
        raise ValueError(f"checkpoint step {step} is negative; expected a step count >= 0")
    return f"step-{step:08d}"


@dataclass
class Checkpoint:
    """One committed checkpoint, read back into memory (tensors on CPU)."""

    step: int
    weights: dict[str, torch.Tensor]
    """Trainable tensors by name, bitwise as saved."""
    optimizer_state: dict
    """``optimizer.state_dict()`` as saved; pass to ``optimizer.load_state_dict``."""
    state: dict
    """The small trainer state passed to ``save`` (data cursor, scheduler, W&B run id, ...), through JSON."""
    rng: dict
    """RNG states as captured by :func:`rng_state`; pass to :func:`set_rng_state`."""
    config_yaml: str
    """The resolved run config, as text."""
    name: str
    """The step folder's name, e.g. ``step-00000123``."""
    uri: str
    """Where the step folder lives."""


class CheckpointManager:
    """Saves checkpoints of one run directory, keeps the newest ``keep``, and finds the one to resume from.

    ``save`` is collective over the ranks of one job: no other job may write under ``checkpoints/`` at the same time.
    """

    def __init__(self, storage: Storage, keep: int = 3):
        if keep < 1:
            raise ValueError(f"checkpoint keep={keep} is invalid; expected at least 1 (the checkpoint just saved)")
        self.storage, self.keep = storage, keep
        self.last_tensor_bytes = 0  # tensor bytes of the last checkpoint saved, over all ranks' parts

    def save(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        optimizer_state: dict,
        state: dict,
        config_yaml: str,
        rank: int = 0,
        world: int = 1,
        all_ok: Callable[[bool], bool] = alone,
    ) -> str:
        """Write a checkpoint of ``step``, point ``latest`` at it, drop old ones; returns the folder name.

        Every rank calls this with the same state; rank ``rank`` of ``world`` uploads its share of the tensors, rank
        0 also the small objects, the marker and the pointer. ``all_ok(ok)`` must return True on every rank iff
        ``ok`` was True on every rank (an all-reduce); it also orders the steps. The RNG states are captured here,
        at the call (rank 0's). A step that is already committed is never overwritten (the run is deterministic, so
        it holds this same state): only ``latest`` is pointed at it again.
        """
        if "step" in state:
            raise ValueError("trainer state has a key 'step'; the checkpoint stores the step itself, pass it as step=")
        name = step_dirname(step)
        folder_key = f"{CHECKPOINTS}/{name}"
        folder = self.storage.sub(folder_key)
        if folder.exists(COMMITTED):
            logger.info("checkpoint %s is already committed; not overwriting it", folder.uri())
        else:
            start = time.perf_counter()
            tensors, skeleton = _split_tensors(weights, optimizer_state)
            sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
            self.last_tensor_bytes = sum(sizes.values())
            share = _shares(sizes, world)[rank]
            # Serialize before touching storage, so a bad value leaves no folder behind.
            objects = {part_name(rank, world): safetensors.torch.save({k: tensors[k] for k in share})}
            if rank == 0:
                objects.update({
                    OPTIMIZER: _torch_bytes(skeleton),
                    RNG: _torch_bytes(rng_state()),
                    STATE: json.dumps({"step": step, **state}, indent=1).encode(),
                    CONFIG: config_yaml.encode(),
                })
                self.storage.delete_prefix(folder_key)  # leftovers of a killed attempt
            all_ok(True)  # nobody uploads before the leftovers are gone
            error = None
            try:
                for key, data in objects.items():
                    folder.write_bytes(key, data)
            except Exception as e:  # noqa: BLE001 - reported to every rank below, then re-raised
                error = e
            if not all_ok(error is None):
                if error is not None:
                    raise error
                raise OSError(f"another rank failed to upload its part of {folder.uri()}; not committing it")
            if rank == 0:
                parts = [part_name(r, world) for r in range(world)]
                missing = [p for p in parts if not folder.exists(p)]
                if missing:
                    raise OSError(f"parts {missing} of {folder.uri()} are missing after upload; not committing it")
                folder.write_bytes(COMMITTED, json.dumps({"step": step, "parts": parts}).encode())
                if not folder.exists(COMMITTED):
                    raise OSError(f"wrote {folder.uri(COMMITTED)} but it does not exist; not pointing {LATEST} at it")
            size = sum(len(data) for data in objects.values())
            logger.info("saved checkpoint %s (%.1f MB from this rank of %d) in %.1f s", folder.uri(), size / 1e6,
                        world, time.perf_counter() - start)
        if rank == 0:
            self._collect_garbage(latest=self._point_latest(name))
        return name

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
        """The checkpoint to resume from, or ``None`` when the run has no committed checkpoint."""
        name = self._latest()
        return None if name is None else _read(self.storage.sub(f"{CHECKPOINTS}/{name}"), name)

    def committed(self) -> list[str]:
        """Names of the committed step folders, oldest first."""
        return [name for name in self._step_dirs() if self.storage.exists(f"{CHECKPOINTS}/{name}/{COMMITTED}")]

    def _step_dirs(self) -> list[str]:
        """Names of all step folders, committed or not, oldest first; other folders are not ours."""
        names = [name for name in self.storage.list_dirs(CHECKPOINTS) if _STEP_DIR.match(name)]
        return sorted(names, key=_step_of)

    def _latest(self) -> str | None:
        """The folder ``latest`` names if it is committed, else the newest committed folder, else ``None``."""
        try:
            name = self.storage.read_bytes(LATEST).decode().strip()
        except FileNotFoundError:
            name = None
        if name is not None and _STEP_DIR.match(name) and self.storage.exists(f"{CHECKPOINTS}/{name}/{COMMITTED}"):
            return name
        committed = self.committed()
        if name is not None:
            fallback = committed[-1] if committed else "nothing"
            logger.warning("%s names %r, not a committed checkpoint; using %s", self.storage.uri(LATEST), name,
                           fallback)
        return committed[-1] if committed else None

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


def _step_of(name: str) -> int:
    return int(_STEP_DIR.match(name).group(1))


def load_checkpoint(uri: str, endpoint_url: str | None = None) -> Checkpoint:
    """Read the checkpoint at ``uri``: a run directory (its latest committed checkpoint) or one step folder.

    Raises ``InputError`` naming the URI and what is there when it holds no committed checkpoint.
    """
    storage = open_storage(uri, endpoint_url)
    if storage.exists(COMMITTED):
        return _read(storage, posixpath.basename(storage.uri()))
    if storage.exists(STATE) or any(key.startswith("tensors-") for key in storage.list()):
        raise InputError(f"{storage.uri()} is an incomplete checkpoint: it has no {COMMITTED} marker (its save was "
                         f"interrupted); holds {_describe(storage)}")
    manager = CheckpointManager(storage)
    if storage.list_dirs(CHECKPOINTS) or storage.exists(LATEST):
        checkpoint = manager.load_latest()
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
    """Read one committed step folder (its parts in parallel)."""
    start = time.perf_counter()
    parts = json.loads(folder.read_bytes(COMMITTED) or b"{}").get("parts")
    if not parts:
        raise InputError(f"{folder.uri(COMMITTED)} names no tensor parts: not a checkpoint this version can read")
    with ThreadPoolExecutor(max(1, min(8, len(parts)))) as pool:
        blobs = list(pool.map(folder.read_bytes, parts))
    tensors = {}
    for part, blob in zip(parts, blobs):
        try:
            tensors.update(safetensors.torch.load(blob))
        except Exception as e:  # noqa: BLE001 - any decoding failure means the object is damaged
            raise InputError(f"checkpoint part {folder.uri(part)} is corrupt ({e}); delete the folder "
                             f"{folder.uri()} to resume from the checkpoint before it") from None
    state = json.loads(folder.read_bytes(STATE))
    skeleton = torch.load(io.BytesIO(folder.read_bytes(OPTIMIZER)), map_location="cpu", weights_only=True)
    checkpoint = Checkpoint(
        step=state.pop("step"),
        weights={k[len("weights/"):]: v for k, v in tensors.items() if k.startswith("weights/")},
        optimizer_state=_fill_tensors(skeleton, tensors),
        state=state,
        rng=torch.load(io.BytesIO(folder.read_bytes(RNG)), weights_only=True),
        config_yaml=folder.read_bytes(CONFIG).decode(),
        name=name,
        uri=folder.uri(),
    )
    logger.info("loaded checkpoint %s in %.1f s", folder.uri(), time.perf_counter() - start)
    return checkpoint


def _split_tensors(weights: dict[str, torch.Tensor], optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of a checkpoint by name ("weights/<name>", "optimizer/<path>"), on CPU, and the optimizer
    state with its tensors replaced by references (small: torch.save'd by rank 0)."""
    tensors = {f"weights/{k}": v.detach().cpu().contiguous() for k, v in weights.items()}

    def strip(obj, path: str):
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return _TENSOR_REF + path
        if isinstance(obj, dict):
            return {k: strip(v, f"{path}/{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(strip(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj

    return tensors, strip(optimizer_state, "optimizer")


def _fill_tensors(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of the stripping in `_split_tensors`."""
    if isinstance(obj, str) and obj.startswith(_TENSOR_REF):
        return tensors[obj[len(_TENSOR_REF):]]
    if isinstance(obj, dict):
        return {k: _fill_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill_tensors(v, tensors) for v in obj)
    return obj


def _shares(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Tensor names split into `world` shares of about equal bytes (largest first onto the lightest share). A pure
    function of names and sizes, so every rank computes the same split without talking to the others."""
    shares, loads = [[] for _ in range(world)], [0] * world
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        lightest = loads.index(min(loads))
        shares[lightest].append(key)
        loads[lightest] += sizes[key]
    return shares


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
