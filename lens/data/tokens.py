"""The token store: a corpus tokenized once, streamed, into fixed-length sequence shards read by global index.

Layout under the store's root (a local path or s3://bucket/prefix):

    plan.json           what the store is (corpus, text field, tokenizer, seq_len, cap, documents per shard, dtype);
                        written first, checked by every writer and reader (no mixed stores)
    shards/00000.bin    shard j: `tokenize(documents [j*D, (j+1)*D) of the corpus)`, D = data.token_shard_docs, as
                        raw little-endian uint16 (vocab <= 65536) or uint32, row-major (n_j, seq_len)
    shards/00000.json   {"sequences": n_j, "sha256": ...}, published after its .bin: shard j is complete
    manifest.json       the plan plus every shard's count and digest, written last: the store is complete

Global sequence k is row k of the shards concatenated in order. Work is split by shard: worker `index` of `count`
tokenizes the shards j with j % count == index; every worker reads the document stream (cheap next to tokenizing)
so that all agree on where shard j starts. Shards are published atomically and skipped when present, so a killed
worker just runs again and the store comes out byte for byte the same. With `data.max_sequences` the store ends at
the first shard where the running count reaches the cap.

Readers memory-map local shards; shards in S3 are fetched once into `$LENS_CACHE/tokens/` (checked against their
digest) and memory-mapped there. So host memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
import threading
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from lens.config import DataConfig
from lens.data.shards import read_json
from lens.data.wait import wait_until
from lens.errors import InputError
from lens.storage import LocalStorage, Storage, file_sha256, open_storage

log = logging.getLogger(__name__)

FORMAT = 1
PLAN = "plan.json"
MANIFEST = "manifest.json"


def shard_bin(j: int) -> str:
    return f"shards/{j:05d}.bin"


def shard_info(j: int) -> str:
    return f"shards/{j:05d}.json"


def store_uri(data: DataConfig) -> str | None:
    """Where this config's token store lives: `data.tokens`, else next to the activation dump (`<activations>/
    tokens`, built by the dump Job), else None: this machine's cache, built by whoever needs it."""
    if data.tokens:
        return data.tokens
    if not data.on_the_fly and data.activations:
        return data.activations.rstrip("/") + "/tokens"
    return None


def store_plan(data: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict:
    """What the store of this config holds. No timestamps or writer ids: every worker computes the same bytes."""
    from lens.data.corpus import tokenizer_digest

    return {
        "format": FORMAT,
        "corpus": data.corpus,
        "text_field": data.text_field,
        "tokenizer": tokenizer_digest(tokenizer),  # the definition, not the path it was loaded from
        "seq_len": data.seq_len,
        "max_sequences": data.max_sequences,
        "docs_per_shard": data.token_shard_docs,
        "dtype": "uint16" if len(tokenizer) <= 1 << 16 else "uint32",
    }


# Store keys -> the config key a user changes to make them agree.
PLAN_KEYS = {"format": "the token store format", "corpus": "data.corpus", "text_field": "data.text_field",
             "tokenizer": "the tokenizer of model.name", "seq_len": "data.seq_len",
             "max_sequences": "data.max_sequences", "docs_per_shard": "data.token_shard_docs",
             "dtype": "the tokenizer's vocabulary size"}


def open_store_storage(data: DataConfig, tokenizer, endpoint_url: str | None) -> tuple[Storage, bool]:
    """The store's storage, and whether it is this machine's cache (then whoever needs it builds it)."""
    uri = store_uri(data)
    if uri is not None:
        return open_storage(uri, endpoint_url), False
    from lens.data.corpus import source_stamp
    from lens.models.hub import default_cache_dir  # lazily: it imports all of transformers' model code

    key = {**store_plan(data, tokenizer), "source": source_stamp(data.corpus)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return LocalStorage(default_cache_dir() / "tokens" / digest), True


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def check_plan(storage: Storage, found: dict, expected: dict, key: str = PLAN) -> None:
    """InputError naming the first config key whose store field differs (found at `storage`/`key`)."""
    for field, what in PLAN_KEYS.items():
        if found.get(field) != expected[field]:
            raise InputError(f"token store {storage.uri(key)} was made for another config: {field} is "
                             f"{found.get(field)!r} there, this run has {expected[field]!r} ({what}); point "
                             f"data.tokens elsewhere or delete {storage.uri()}")


# ----------------------------------------------------------------------------------------------- building


def build(data: DataConfig, tokenizer: PreTrainedTokenizerBase, storage: Storage, index: int = 0,
          count: int = 1) -> bool:
    """Tokenize this worker's shards of the store into `storage`. True when the whole store is complete (manifest
    written, by this or another worker). Raises InputError for a store of another config or an unreadable corpus."""
    from lens.data.corpus import iter_texts, tokenize

    plan = store_plan(data, tokenizer)
    if _claim(storage, plan):
        return True
    dtype = np.dtype(plan["dtype"]).newbyteorder("<")
    docs = iter_texts(data.corpus, data.text_field)
    published = _PublishedPrefix(storage, data.max_sequences)
    written = 0
    for j in itertools.count():
        chunk = list(itertools.islice(docs, data.token_shard_docs))
        if not chunk:
            break
        if j % count != index:
            continue
        if not storage.exists(shard_info(j)):
            rows = tokenize(chunk, tokenizer, data.seq_len).numpy().astype(dtype)
            payload = rows.tobytes()
            storage.write_bytes(shard_bin(j), payload)
            storage.write_bytes(shard_info(j), _json({"sequences": len(rows),
                                                      "sha256": hashlib.sha256(payload).hexdigest()}))
            written += 1
            log.info("token store: shard %d: %d sequences of %d documents -> %s", j, len(rows), len(chunk),
                     storage.uri(shard_bin(j)))
        if data.max_sequences is not None and published.reached() is not None:
            break  # the cap is reached by shards already published: no later shard belongs to the store
    return _finish(storage, plan, j, written, published)  # j: the shards the stream yields, when it ran to its end


def _claim(storage: Storage, plan: dict) -> bool:
    """Check the store holds nothing but this plan; write the plan if absent. True if already complete."""
    for key in (MANIFEST, PLAN):
        found = read_json(storage, key)
        if found is not None:
            check_plan(storage, found, plan, key)
            if key == MANIFEST:
                return True
    if read_json(storage, PLAN) is None:
        storage.write_bytes(PLAN, _json(plan))
    return False


class _PublishedPrefix:
    """Shards 0, 1, ... published so far, each shard's info read once (a capped store of thousands of shards is
    checked after every shard, so rereading them all each time would cost a quadratic number of reads)."""

    def __init__(self, storage: Storage, cap: int | None):
        self.storage, self.cap, self.infos, self.total = storage, cap, [], 0

    def reached(self, n_shards: int | None = None) -> list[dict] | None:
        """Infos of the shortest run of published shards 0, 1, ... whose sequences reach the cap, or of the first
        `n_shards` (all the stream yields) when they are published first; None while neither is."""
        while not self.capped and (n_shards is None or len(self.infos) < n_shards):
            info = read_json(self.storage, shard_info(len(self.infos)))
            if info is None:
                return None
            self.infos.append(info)
            self.total += info["sequences"]
        return self.infos if self.capped else self.infos[:n_shards]

    @property
    def capped(self) -> bool:
        return self.cap is not None and self.total >= self.cap


def _finish(storage: Storage, plan: dict, n_shards: int, written: int, published: _PublishedPrefix) -> bool:
    """Write the manifest when every shard of the store is published. True when the store is complete."""
    infos = published.reached(n_shards)
    if infos is None:
        log.info("token store: this worker wrote %d shards; others still missing in %s", written, storage.uri())
        return False
    manifest = {**plan, "shards": [[i["sequences"], i["sha256"]] for i in infos],
                "sequences": sum(i["sequences"] for i in infos)}
    if read_json(storage, MANIFEST) is None:
        storage.write_bytes(MANIFEST, _json(manifest))
    log.info("token store: complete, %d sequences in %d shards, %s", manifest["sequences"], len(infos),
             storage.uri(MANIFEST))
    return True


def progress(storage: Storage) -> str:
    """`3 shards so far` for the wait log line (the shard total is known only once the stream is read)."""
    done = sum(1 for k in storage.list("shards") if k.endswith(".json"))
    return f"{done} shards so far"


# ----------------------------------------------------------------------------------------------- reading


class TokenStore:
    """A complete store's sequences by global index: `rows(ids)` -> (n, seq_len) int64. Shards are memory-mapped
    (fetched into the local cache first when remote), so memory holds only the pages read."""

    def __init__(self, storage: Storage, manifest: dict):
        self.storage, self.manifest = storage, manifest
        self.seq_len = manifest["seq_len"]
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        counts = torch.tensor([n for n, _ in manifest["shards"]], dtype=torch.int64)
        self.starts = torch.cumsum(counts, 0) - counts  # first global row of each shard
        self.n = int(counts.sum())
        self._maps: dict[int, np.memmap] = {}
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """Short digest of the store's content (every shard's sha256 and the plan)."""
        return hashlib.sha256(_json(self.manifest)).hexdigest()[:16]

    @classmethod
    def open(cls, data: DataConfig, tokenizer, endpoint_url: str | None = None, index: int = 0, count: int = 1,
             build_here: bool | None = None) -> TokenStore:
        """The store of this config, complete. A store in this machine's cache (or `build_here=True`, as `lens
        dump` does) is built here first (this worker's share); one built by a data Job is waited for, up to
        `data.wait_timeout`, logging once per interval."""
        storage, local_cache = open_store_storage(data, tokenizer, endpoint_url)
        storage.check()
        plan = store_plan(data, tokenizer)
        if build_here if build_here is not None else local_cache:
            build(data, tokenizer, storage, index, count)
        else:
            found = read_json(storage, PLAN)
            if found is not None:  # a store of another config fails now, not after the wait
                check_plan(storage, found, plan)
        wait_until(lambda: storage.exists(MANIFEST), f"token store {storage.uri()}", lambda: progress(storage),
                   data.wait_timeout)
        manifest = json.loads(storage.read_bytes(MANIFEST))
        check_plan(storage, manifest, plan, MANIFEST)
        return cls(storage, manifest)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Global sequence indices (n,) -> LongTensor (n, seq_len)."""
        ids = ids.to(torch.int64)
        out = torch.empty((len(ids), self.seq_len), dtype=torch.int64)
        shard = torch.searchsorted(self.starts, ids, right=True) - 1
        for s in shard.unique().tolist():
            here = (shard == s).nonzero().squeeze(1)
            local = (ids[here] - self.starts[s]).numpy()
            out[here] = torch.from_numpy(self._map(s)[local].astype(np.int64))
        return out

    def _map(self, j: int) -> np.memmap:
        with self._lock:
            if j not in self._maps:
                self._maps[j] = np.memmap(self._local_file(j), dtype=self.dtype, mode="r",
                                          shape=(self.manifest["shards"][j][0], self.seq_len))
            return self._maps[j]

    def _local_file(self, j: int) -> str:
        """Path of shard j on this machine: the file itself, or a checked copy of the remote one in the cache."""
        n, sha = self.manifest["shards"][j]
        if isinstance(self.storage, LocalStorage):
            path = self.storage.uri(shard_bin(j))
            if not os.path.isfile(path) or os.path.getsize(path) != n * self.seq_len * self.dtype.itemsize:
                raise InputError(f"token shard {path} is missing or truncated, though {self.storage.uri(MANIFEST)} "
                                 f"says the store is complete (delete {self.storage.uri()} and rerun `lens dump` with "
                                 f"this config to rebuild it)")
            return path
        from lens.models.hub import default_cache_dir

        path = default_cache_dir() / "tokens" / "remote" / sha[:32]
        if not path.is_file():  # content-addressed: a present file is a complete, checked copy
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".fetch.", suffix=".tmp")
            os.close(fd)
            try:
                self.storage.read_file(shard_bin(j), tmp)
                if file_sha256(tmp) != sha:
                    raise InputError(f"token shard {self.storage.uri(shard_bin(j))} does not match its digest in "
                                     f"{self.storage.uri(MANIFEST)} (delete {self.storage.uri()} and rerun `lens dump` "
                                     f"with this config to rebuild it)")
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return str(path)


class SequenceView:
    """Rows [lo, hi) of a store as a read-only sequence of (seq_len,) token rows: `view[ids]` with a LongTensor
    or a slice gives a LongTensor (n, seq_len); `len(view)` the row count."""

    def __init__(self, store: TokenStore, lo: int, hi: int):
        self.store, self.lo, self.hi = store, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.store.seq_len)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index, dtype=torch.int64)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        return self.store.rows(index + self.lo)
