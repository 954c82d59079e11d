"""Dumped activations: the layout under `data.activations`, and `ShardSource`, which streams them into training.

Layout (written by `lens/data/dump.py`):

    tokens/                            the token store of the corpus (`lens/data/tokens.py`), unless data.tokens
    plan.json                          the manifest-to-be, written first; every writer checks it (no mixed dumps)
    train/shard-00000.safetensors      samples [0, shard_size) of the train split, then the next shard_size, ...
    val/shard-00000.safetensors        the same for the validation split
    manifest.json                      written last, once every shard of every split exists: the dump is complete

A shard holds `A.<L>` (n, d) in the model dtype for each dumped layer L (`data.layers`, one forward), `input_ids`
(n, seq_len) int64, `token_pos` (n,) int64, and with resample ablation `A_prime.<L>`, `input_ids_prime`,
`token_pos_prime` (A' captured in another sequence). Dump sample i of a split is sequence i of that split (see
`lens/data/dump.py` for its position). The manifest records everything a sample depends on; a run whose config
gives another value for any of them is refused with exit 2 naming the field (`check_manifest`).

Training draws global sample g exactly as `OnTheFlySource` does: epoch g // N, entry g % N of the seeded permutation
`rng.Permutation(N, seed, rng.PERMUTATION, epoch)`. So the cursor logic (`SampleCursor`, `split_for_rank`) is
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

from lens.data.source import EpochOrder
from lens.data.wait import wait_until
from lens.errors import InputError
from lens.storage import Storage, open_storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PLAN = "plan.json"
SPLITS = ("train", "val")
FORMAT = 2
# How a dump sample's position and A' context are chosen (`lens/data/dump.py`); a new rule gets a new name.
POSITIONS = "uniform[first+min_pos, seq_len-1] keyed (seed, POSITION|VAL_POSITION, i); A' row (i+N//2)%N keyed " \
            "(seed, RESAMPLE, i)"
# Keys of the manifest that must agree with the run config for the activations to mean what training assumes,
# and the config key to change. (`layers` must contain model.layer; `splits` and `shard_size` are layout.)
CHECKED = {"format": "the dump format (dump again with this version)", "model": "model.name",
           "d_model": "d_model (of model.name)", "dtype": "model.dtype", "tokenizer": "the tokenizer of model.name",
           "corpus": "data.corpus", "text_field": "data.text_field", "seq_len": "data.seq_len",
           "min_pos": "data.min_pos", "max_sequences": "data.max_sequences", "val_fraction": "data.val_fraction",
           # after the settings it depends on, so a changed setting is named rather than the fingerprint
           "corpus_fingerprint": "the corpus content (data.corpus files, data.max_sequences, data.val_fraction)",
           "seed": "run.seed", "positions": "the position rule"}


def dump_layers(cfg) -> list[int]:
    """The blocks a dump of `cfg` captures: data.layers, else model.layer."""
    return sorted(set(cfg.data.layers)) if cfg.data.layers else [cfg.model.layer]


def expected_manifest(cfg, corpus, tokenizer, d_model: int) -> dict:
    """The manifest this config and corpus produce. No timestamps or writer ids: every worker computes the same."""
    from lens.data.corpus import tokenizer_digest

    size = cfg.data.shard_size
    counts = {"train": len(corpus.train), "val": len(corpus.val)}
    return {
        "format": FORMAT,
        "splits": {s: {"count": c, "shards": n_shards(c, size)} for s, c in counts.items()},
        "shard_size": size,
        "d_model": d_model,
        "layers": dump_layers(cfg),
        "model": cfg.model.name,
        "tokenizer": tokenizer_digest(tokenizer),  # the definition, not the path it was loaded from
        "dtype": cfg.model.dtype,
        "seed": cfg.run.seed,
        "corpus": cfg.data.corpus,
        "text_field": cfg.data.text_field,
        "corpus_fingerprint": corpus.fingerprint,
        "seq_len": corpus.seq_len,
        "min_pos": cfg.data.min_pos,
        "max_sequences": cfg.data.max_sequences,
        "val_fraction": cfg.data.val_fraction,
        "positions": POSITIONS,
        "resample_ablation": cfg.loss.resample_ablation,
    }


def check_manifest(uri: str, found: dict, expected: dict, layer: int) -> None:
    """InputError naming the first field in which the dump at `uri` differs from what this run would dump, or when
    it lacks `layer` or the A' pairs the run needs."""
    for key, what in CHECKED.items():
        if found.get(key) != expected.get(key):
            raise InputError(f"activation dump {uri} does not match the run: {key} is {found.get(key)!r} there, "
                             f"{expected.get(key)!r} for this run ({what}); dump again, or point data.activations "
                             f"elsewhere")
    if layer not in found.get("layers", []):
        raise InputError(f"activation dump {uri} does not match the run: model.layer is {layer} but the dump has "
                         f"layers={found.get('layers')!r} (dump with data.layers including {layer})")
    if expected.get("resample_ablation") and not found.get("resample_ablation"):
        raise InputError(f"activation dump {uri} has no A' pairs, which loss.resample_ablation=true needs (dump "
                         f"with loss.resample_ablation=true)")


def check_shard(tensors: dict, manifest: dict, split: str, shard: int, layers: list[int]) -> str | None:
    """What is wrong with a loaded shard's tensors (names and shapes the manifest implies), or None."""
    count = manifest["splits"][split]["count"]
    n = min(manifest["shard_size"], count - shard * manifest["shard_size"])
    want = {"input_ids": (n, manifest["seq_len"]), "token_pos": (n,)}
    names = ["A"] + (["A_prime"] if manifest.get("resample_ablation") else [])
    want |= {f"{name}.{layer}": (n, manifest["d_model"]) for name in names for layer in layers}
    if manifest.get("resample_ablation"):
        want |= {"input_ids_prime": want["input_ids"], "token_pos_prime": (n,)}
    for name, shape in want.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "absent"
            return f"{name} has shape {got}, expected {shape}"
    return None


def shard_key(split: str, shard: int) -> str:
    return f"{split}/shard-{shard:05d}.safetensors"


def n_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def all_shard_keys(manifest: dict) -> list[str]:
    """Every shard key the dump described by `manifest` (or plan) consists of, train first."""
    return [shard_key(split, s) for split in SPLITS
            for s in range(n_shards(manifest["splits"][split]["count"], manifest["shard_size"]))]


def read_json(storage: Storage, key: str) -> dict | None:
    """The JSON object at `key`, or None when there is none. Such files are published whole (write, then rename), so
    one that does not parse is damaged: bad input naming it, with the remedy."""
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{storage.uri(key)} is damaged (not JSON: {e}); delete it and rerun `lens dump`, which "
                         f"verifies what is there and rewrites what is missing") from None


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

    def __init__(self, storage: Storage, manifest: dict, seed: int, layer: int, cache_shards: int = 16,
                 prefetch: bool = True):
        self.storage, self.manifest, self.seed, self.layer = storage, manifest, seed, layer
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
    def open(cls, uri: str, expected: dict, *, layer: int, seed: int, endpoint_url: str | None = None,
             wait_timeout: float = 0.0, **kwargs) -> ShardSource:
        """Open the dump at `uri`, waiting up to `wait_timeout` s for it to complete (one log line per interval),
        and check it against `expected` (`expected_manifest` of the run): raises `InputError` naming the
        mismatching field (`check_manifest`). `layer` is the dumped block read; `seed` orders the samples (the
        run's). `kwargs` go to the constructor."""
        storage = open_storage(uri, endpoint_url)
        storage.check()
        plan = read_json(storage, PLAN)
        if plan is not None:  # a dump of another config fails now, not after the wait
            check_manifest(storage.uri(PLAN), plan, expected, layer)

        def progress() -> str:
            plan = read_json(storage, PLAN)
            if plan is None:
                return "not started"
            present = set(storage.list())
            keys = all_shard_keys(plan)
            return f"{sum(k in present for k in keys)}/{len(keys)} shards"

        wait_until(lambda: storage.exists(MANIFEST), f"activation dump {storage.uri()}", progress, wait_timeout)
        manifest = read_json(storage, MANIFEST)
        check_manifest(storage.uri(MANIFEST), manifest, expected, layer)
        return cls(storage, manifest, seed, layer, **kwargs)

    @classmethod
    def from_config(cls, cfg, corpus, tokenizer, d_model: int, **kwargs) -> ShardSource:
        """`open` with everything taken from a `LensConfig` and its `Corpus`."""
        return cls.open(cfg.data.activations, expected_manifest(cfg, corpus, tokenizer, d_model), layer=cfg.model.layer,
                        seed=cfg.run.seed, endpoint_url=cfg.storage.endpoint_url,
                        wait_timeout=cfg.data.wait_timeout, **kwargs)

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
        names = ("input_ids", "token_pos", f"A.{self.layer}") + ((f"A_prime.{self.layer}",) if self.has_prime else ())
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
                             f"dump is complete; rerun `lens dump` with this config (it rewrites missing shards)"
                             ) from None
        try:
            tensors = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled bytes
            raise InputError(f"activation shard {uri} is corrupt ({type(e).__name__}: {str(e)[:200]}); "
                             f"rerun `lens dump` with this config (it rewrites corrupt shards)") from None
        problem = check_shard(tensors, self.manifest, split, shard, [self.layer])
        if problem is not None:
            raise InputError(f"activation shard {uri} is corrupt: {problem}; rerun `lens dump` with this config "
                             f"(it rewrites corrupt shards)")
        return tensors
