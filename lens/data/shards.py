"""Dumped activations: the layout under `data.activations`, and `ShardSource`, which streams them into training.

Layout (written by `lens/data/dump.py`):

    plan.json                          the manifest-to-be, written first; every writer checks it (no mixed dumps)
    train/shard-00000.safetensors      samples [0, shard_size) of the train split, then the next shard_size, ...
    val/shard-00000.safetensors        the same for the validation split
    manifest.json                      written last, once every shard of every split exists: the dump is complete

A shard holds `A` (n, d) in the model dtype, `input_ids` (n, seq_len) int64, `token_pos` (n,) int64, and with resample
ablation `A_prime`, `input_ids_prime`, `token_pos_prime` (A' captured in another sequence). Dump sample i of a split
is sequence i of that split (see `lens/data/dump.py` for its position).

Training draws global sample g exactly as `OnTheFlySource` does: epoch g // N, entry g % N of the seeded permutation
`rng.permutation(N, seed, rng.PERMUTATION, epoch)`. So the cursor logic (`SampleCursor`, `split_for_rank`) is
shared, and a resumed or resized job reads exactly the next unseen samples.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from safetensors.torch import load as load_safetensors

from lens import rng
from lens.data.source import EpochOrder
from lens.errors import InputError
from lens.storage import Storage, open_storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLAN = "plan.json"
SPLITS = ("train", "val")
FORMAT = 1
# Keys of the manifest that must agree with the run config for the activations to mean what training assumes.
CHECKED = {"model": "model.name", "layer": "model.layer", "d_model": "d_model (of model.name)",
           "seq_len": "data.seq_len"}


def shard_key(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.safetensors"


def n_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def all_shard_keys(manifest: dict) -> list[str]:
    """Every shard key the dump described by `manifest` (or plan) consists of, train first."""
    return [shard_key(split, s) for split in SPLITS
            for s in range(n_shards(manifest["splits"][split]["count"], manifest["shard_size"]))]


def read_json(storage: Storage, key: str) -> dict | None:
    """The JSON object at `key`, or None when there is none."""
    try:
        return json.loads(storage.read_bytes(key))
    except FileNotFoundError:
        return None


def manifest_mismatch(found: dict, expected: dict) -> list[str]:
    """Sorted keys (dotted for nested ones) whose values differ between two manifests."""
    keys = []
    for k in sorted(set(found) | set(expected)):
        a, b = found.get(k), expected.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{k}.{sub}" for sub in manifest_mismatch(a, b)]
        elif a != b:
            keys.append(k)
    return keys


class ShardSource:
    """Samples of a complete dump by global index, read shard by shard with an LRU cache and prefetch.

    Memory: at most `cache_shards` shards plus the ones being prefetched, never the whole dataset.
    Thread safety: one trainer thread calls `lookup`/`val_batch`; loads run on a small background pool.
    """

    def __init__(self, storage: Storage, manifest: dict, seed: int, cache_shards: int = 16, prefetch: bool = True):
        self.storage, self.manifest, self.seed = storage, manifest, seed
        self.shard_size = manifest["shard_size"]
        self.has_prime = bool(manifest.get("resample_ablation"))
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="shard-prefetch") if prefetch else None
        self.order = EpochOrder(manifest["splits"]["train"]["count"], seed)
        self._last_start: int | None = None  # first global id of the previous lookup: its stride predicts the next

    @classmethod
    def open(cls, uri: str, *, model: str, layer: int, d_model: int, seq_len: int, seed: int,
             resample_ablation: bool = False, corpus_fingerprint: str | None = None,
             endpoint_url: str | None = None, **kwargs) -> ShardSource:
        """Open the dump at `uri` and check it against the run: raises `InputError` naming the mismatching key,
        or when the dump is incomplete (no manifest) or lacks the A' pairs resample ablation needs.
        `corpus_fingerprint` (of the run's `Corpus`), when given, must equal the dump's. `seed` orders the samples
        (the run's seed; the dump's own seed only chose the positions). `kwargs` go to the constructor."""
        storage = open_storage(uri, endpoint_url)
        storage.check()
        manifest = read_json(storage, MANIFEST)
        if manifest is None:
            raise InputError(f"no complete activation dump at {storage.uri()}: {storage.uri(MANIFEST)} is missing "
                             f"(run `lens dump` with this config until it exits 0)")
        wanted = {"model": model, "layer": layer, "d_model": d_model, "seq_len": seq_len}
        for key, value in wanted.items():
            if manifest.get(key) != value:
                raise InputError(f"activation dump {storage.uri(MANIFEST)} does not match the run: {CHECKED[key]} is "
                                 f"{value!r} but the dump has {key}={manifest.get(key)!r} (dump again, or point "
                                 f"data.activations elsewhere)")
        if corpus_fingerprint is not None and manifest.get("corpus_fingerprint") != corpus_fingerprint:
            raise InputError(f"activation dump {storage.uri(MANIFEST)} was made from another corpus (fingerprint "
                             f"{manifest.get('corpus_fingerprint')!r}, this run's data.corpus/data.seq_len/"
                             f"data.max_sequences/data.val_fraction give {corpus_fingerprint!r})")
        if resample_ablation and not manifest.get("resample_ablation"):
            raise InputError(f"activation dump {storage.uri(MANIFEST)} has no A' pairs, which "
                             f"loss.resample_ablation=true needs (dump with loss.resample_ablation=true)")
        return cls(storage, manifest, seed, **kwargs)

    @classmethod
    def from_config(cls, cfg, d_model: int, corpus_fingerprint: str | None = None, **kwargs) -> ShardSource:
        """`open` with everything taken from a `LensConfig` (`cfg.data.activations`, model, layer, seq_len, seed)."""
        return cls.open(cfg.data.activations, model=cfg.model.name, layer=cfg.model.layer, d_model=d_model,
                        seq_len=cfg.data.seq_len, seed=cfg.run.seed, resample_ablation=cfg.loss.resample_ablation,
                        corpus_fingerprint=corpus_fingerprint, endpoint_url=cfg.storage.endpoint_url, **kwargs)

    # ------------------------------------------------------------------------------------------- sampling

    @property
    def n_train(self) -> int:
        return self.manifest["splits"]["train"]["count"]

    @property
    def n_val(self) -> int:
        return self.manifest["splits"]["val"]["count"]

    def steps_per_epoch(self, global_batch: int) -> int:
        """Optimizer steps per pass over the training set: ceil(N / global_batch)."""
        return math.ceil(self.n_train / global_batch)

    def lookup(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Samples by global index (LongTensor (n,), may straddle epochs) -> input_ids (n, seq_len) int64,
        positions (n,) int64, A (n, d) in the dump dtype, A_prime (n, d) or None without resample ablation.
        The sequence order is `OnTheFlySource`'s; the positions are the dump's (fixed per sequence, keyed by the
        dump row), not re-drawn per global index. All on CPU."""
        rows = self.order.rows(global_ids)
        self._prefetch_next(global_ids)
        return self._rows("train", rows)

    def val_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first n validation samples of the dump (cycling when there are fewer). Shapes as in `lookup`."""
        return self._rows("val", torch.arange(n, dtype=torch.int64) % self.n_val)

    def lookup_prime(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context of each sample's A': input_ids_prime (n, seq_len) and token_pos_prime (n,)."""
        if not self.has_prime:
            raise InputError("this activation dump has no A' pairs (dump with loss.resample_ablation=true)")
        return self._gather("train", self.order.rows(global_ids), ("input_ids_prime", "token_pos_prime"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _rows(self, split: str, rows: torch.Tensor):
        names = ("input_ids", "token_pos", "A") + (("A_prime",) if self.has_prime else ())
        out = self._gather(split, rows, names)
        return (*out, None) if not self.has_prime else tuple(out)

    def _gather(self, split: str, rows: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Tensors `names` at dump rows `rows` of `split`, in order; each needed shard is loaded once."""
        shard_of, offset = rows // self.shard_size, rows % self.shard_size
        out: list[torch.Tensor | None] = [None] * len(names)
        for s in shard_of.unique().tolist():
            here = (shard_of == s).nonzero().squeeze(1)
            tensors = self._shard(split, s)
            for j, name in enumerate(names):
                t = tensors[name]
                if out[j] is None:
                    out[j] = torch.empty((len(rows), *t.shape[1:]), dtype=t.dtype)
                out[j][here] = t[offset[here]]
        if out[0] is None:  # no rows: empty tensors of the right shapes
            return [torch.empty(0, dtype=torch.int64) for _ in names]
        return out

    # ------------------------------------------------------------------------------------------- shard cache

    def _prefetch_next(self, global_ids: torch.Tensor) -> None:
        """Start loading the shards the next lookup will need. Global ids advance by a fixed stride per step (the
        global batch), so the next share of this rank is these ids plus the stride since the previous lookup."""
        if self._pool is None or len(global_ids) == 0:
            return
        start = int(global_ids.min())
        stride = start - self._last_start if self._last_start is not None and start > self._last_start \
            else len(global_ids)
        self._last_start = start
        rows = self.order.rows(global_ids + stride)
        with self._lock:
            room = self.cache_shards - len(self._pending)
            for s in (rows // self.shard_size).unique().tolist()[: max(room, 0)]:
                key = shard_key("train", s)
                if key not in self._cache and key not in self._pending:
                    self._pending[key] = self._pool.submit(self._load, "train", s)

    def _shard(self, split: str, shard: int) -> dict[str, torch.Tensor]:
        key = shard_key(split, shard)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            future = self._pending.pop(key, None)
        tensors = future.result() if future is not None else self._load(split, shard)
        with self._lock:
            self._cache[key] = tensors
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        return tensors

    def _load(self, split: str, shard: int) -> dict[str, torch.Tensor]:
        """Read and check one shard; a missing or corrupt one is an `InputError` naming its URI."""
        key = shard_key(split, shard)
        uri = self.storage.uri(key)
        try:
            data = self.storage.read_bytes(key)
        except FileNotFoundError:
            raise InputError(f"activation shard {uri} is missing, though {self.storage.uri(MANIFEST)} says the "
                             f"dump is complete (dump again into an empty location)") from None
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled bytes
            raise InputError(f"activation shard {uri} is corrupt ({type(e).__name__}: {str(e)[:200]}); "
                             f"delete it and rerun `lens dump` to rewrite it") from None
        count = self.manifest["splits"][split]["count"]
        n = min(self.shard_size, count - shard * self.shard_size)
        want = {"A": (n, self.manifest["d_model"]), "input_ids": (n, self.manifest["seq_len"]), "token_pos": (n,)}
        if self.has_prime:
            want |= {"A_prime": want["A"], "input_ids_prime": want["input_ids"], "token_pos_prime": (n,)}
        for name, shape in want.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "absent"
                raise InputError(f"activation shard {uri} is corrupt: {name} has shape {got}, expected {shape}; "
                                 f"delete it and rerun `lens dump` to rewrite it")
        return tensors
