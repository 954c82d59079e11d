"""`lens dump`: capture activations of a corpus into safetensors shards, plus a manifest written last.

What dump sample i of a split is (a pure function of config and corpus, so any worker, rerun or index split writes
the same bytes for it):
  * train: training sequence i, explained position `sample_positions(key(seed, POSITION, i))`;
  * val: validation sequence i, position keyed by `(seed, VAL_POSITION, i)`;
  * with `loss.resample_ablation`, A' of sample i comes from sequence (i + N // 2) % N of the same split (another
    context whenever N >= 2), at a position keyed by `(seed, RESAMPLE, i)`.
Training does not read the dump in this order: `ShardSource` applies the per-epoch permutation on top.

Work is split by shard: shards are numbered train first, then val, and worker `index` of `count` (a Kubernetes
Indexed Job's pod) writes the shards j with j % count == index. Each shard is captured in batches that depend only on
the shard, published atomically, and skipped when it already exists, so a killed worker just runs again. Whichever
worker finds every shard present writes `manifest.json`; its content does not depend on who writes it.
See `lens/data/shards.py` for the layout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors

from lens import rng
from lens.config import LensConfig, check_against_model
from lens.data.corpus import Corpus, _tokenizer_digest, sample_positions
from lens.data.shards import FORMAT, MANIFEST, PLAN, SPLITS, all_shard_keys, manifest_mismatch, n_shards, read_json, \
    shard_key
from lens.errors import InputError
from lens.models.hub import DTYPES, load_model
from lens.models.orig import Orig
from lens.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class SplitSamples:
    """Everything needed to capture the samples of one split: (N, seq_len) ids and (N,) positions, and their A'
    context when resample ablation is on."""

    input_ids: torch.Tensor
    token_pos: torch.Tensor
    input_ids_prime: torch.Tensor | None = None
    token_pos_prime: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def split_samples(corpus: Corpus, split: str, seed: int, min_pos: int, prime: bool) -> SplitSamples:
    """The dump samples of `split` (module docstring), in dump order."""
    tokens = corpus.train if split == "train" else corpus.val
    n = len(tokens)
    i = torch.arange(n, dtype=torch.int64)
    stream = rng.POSITION if split == "train" else rng.VAL_POSITION
    samples = SplitSamples(tokens, sample_positions(rng.key(seed, stream, i), corpus.first, corpus.seq_len, min_pos))
    if prime:
        samples.input_ids_prime = tokens[(i + n // 2) % n]
        samples.token_pos_prime = sample_positions(rng.key(seed, rng.RESAMPLE, i), corpus.first, corpus.seq_len,
                                                   min_pos)
    return samples


def expected_manifest(cfg: LensConfig, corpus: Corpus, tokenizer, d_model: int) -> dict:
    """The manifest this config and corpus produce. No timestamps or writer ids: every worker computes the same."""
    size = cfg.data.shard_size
    counts = {"train": len(corpus.train), "val": len(corpus.val)}
    return {
        "format": FORMAT,
        "splits": {s: {"count": c, "shards": n_shards(c, size)} for s, c in counts.items()},
        "shard_size": size,
        "d_model": d_model,
        "layer": cfg.model.layer,
        "model": cfg.model.name,
        "tokenizer": {"name": tokenizer.name_or_path, "digest": _tokenizer_digest(tokenizer)},
        "dtype": cfg.model.dtype,
        "seed": cfg.run.seed,
        "corpus_fingerprint": corpus.fingerprint,
        "seq_len": corpus.seq_len,
        "min_pos": cfg.data.min_pos,
        "resample_ablation": cfg.loss.resample_ablation,
    }


def worker_slot(index: int | None, count: int | None) -> tuple[int, int]:
    """(index, count) from the flags, else from the environment, else (0, 1).

    An Indexed Job's pods get `JOB_COMPLETION_INDEX` from Kubernetes; the count is not set by Kubernetes, so it
    comes from `JOB_COMPLETION_COUNT` or `LENS_DUMP_WORKERS` (what our chart sets to the Job's completions)."""
    env = os.environ
    if index is None:
        index = int(env.get("JOB_COMPLETION_INDEX", "0"))
    if count is None:
        count = int(env.get("JOB_COMPLETION_COUNT") or env.get("LENS_DUMP_WORKERS") or "1")
    if count < 1 or not 0 <= index < count:
        raise InputError(f"dump worker index {index} of {count} is invalid; expected 0 <= index < count (--index/"
                         f"--count, or JOB_COMPLETION_INDEX with JOB_COMPLETION_COUNT or LENS_DUMP_WORKERS)")
    return index, count


def dump(cfg: LensConfig, index: int | None = None, count: int | None = None) -> bool:
    """Write this worker's shards of the dump described by `cfg` into `cfg.data.activations`.

    Returns True when the whole dataset (all workers) is complete and its manifest written. Raises `InputError`
    (before writing anything) for an unusable target, an unloadable model, or a target holding another dump."""
    index, count = worker_slot(index, count)
    if not cfg.data.activations:
        raise InputError("data.activations is not set; expected the dump target (a local path or s3://bucket/prefix)")
    storage = open_storage(cfg.data.activations, cfg.storage.endpoint_url)
    storage.check()  # a missing bucket or bad credentials fail now, not after the model has loaded
    lm, tokenizer = load_model(cfg.model.name, DTYPES[cfg.model.dtype])
    d_model = lm.config.hidden_size
    check_against_model(cfg, lm.config.num_hidden_layers, d_model)
    corpus = Corpus.build(cfg.data, tokenizer)
    expected = expected_manifest(cfg, corpus, tokenizer, d_model)
    if _claim(storage, expected):
        log.info("dump: %s is already complete", storage.uri(MANIFEST))
        return True

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    orig = Orig(lm.to(device))
    todo = [(split, s) for split in SPLITS for s in range(expected["splits"][split]["shards"])]
    mine = [job for j, job in enumerate(todo) if j % count == index]
    samples = {split: split_samples(corpus, split, cfg.run.seed, cfg.data.min_pos, cfg.loss.resample_ablation)
               for split in SPLITS}
    log.info("dump: worker %d of %d, %d of %d shards -> %s", index, count, len(mine), len(todo), storage.uri())
    bar = _progress(len(mine))
    for k, (split, shard) in enumerate(mine, 1):
        key = shard_key(split, shard)
        start = time.perf_counter()
        if storage.exists(key):  # published atomically, so an existing shard is complete
            status = "exists, skipped"
        else:
            write_shard(storage, key, orig, samples[split], shard, cfg, device)
            status = f"written in {time.perf_counter() - start:.1f} s"
        if bar is not None:
            bar.update(1)
        else:
            log.info("dump: shard %d/%d %s %s", k, len(mine), storage.uri(key), status)
    if bar is not None:
        bar.close()
    return finish(storage, expected)


def _claim(storage: Storage, expected: dict) -> bool:
    """Check the target holds nothing but this dump; write the plan if absent. True if already complete."""
    for key in (MANIFEST, PLAN):
        found = read_json(storage, key)
        if found is not None and found != expected:
            differ = ", ".join(manifest_mismatch(found, expected))
            raise InputError(f"{storage.uri(key)} describes another dump (differs in: {differ}); refusing to mix "
                             f"shards: dump into an empty location or delete {storage.uri()}")
        if found is not None and key == MANIFEST:
            return True
    if read_json(storage, PLAN) is None:
        storage.write_bytes(PLAN, _json(expected))  # concurrent workers write identical bytes
    return False


def write_shard(storage: Storage, key: str, orig: Orig, samples: SplitSamples, shard: int, cfg: LensConfig,
                device: torch.device) -> None:
    """Capture samples [shard * shard_size, ...) of one split and publish them as one safetensors object."""
    lo = shard * cfg.data.shard_size
    hi = min(lo + cfg.data.shard_size, len(samples))
    dtype = DTYPES[cfg.model.dtype]
    tensors = {"input_ids": samples.input_ids[lo:hi].contiguous(), "token_pos": samples.token_pos[lo:hi].contiguous()}
    tensors["A"] = capture(orig, tensors["input_ids"], tensors["token_pos"], cfg.model.layer,
                           cfg.data.dump_batch_size, device).to(dtype)
    if samples.input_ids_prime is not None:
        tensors["input_ids_prime"] = samples.input_ids_prime[lo:hi].contiguous()
        tensors["token_pos_prime"] = samples.token_pos_prime[lo:hi].contiguous()
        tensors["A_prime"] = capture(orig, tensors["input_ids_prime"], tensors["token_pos_prime"], cfg.model.layer,
                                     cfg.data.dump_batch_size, device).to(dtype)
    storage.write_bytes(key, save_safetensors(tensors, metadata={"first_sample": str(lo)}))


def capture(orig: Orig, input_ids: torch.Tensor, positions: torch.Tensor, layer: int, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Block `layer`'s output at each row's position, (n, seq_len) ids and (n,) positions -> (n, d) fp32 on CPU.

    Batches of `batch_size` rows, each cut after its own last position with early exit (`Orig.capture`); bf16
    autocast on GPU."""
    out = []
    for s in range(0, len(input_ids), batch_size):
        ids, pos = input_ids[s:s + batch_size].to(device), positions[s:s + batch_size].to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(orig.capture(ids, layer, pos).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def finish(storage: Storage, expected: dict) -> bool:
    """Write the manifest if every shard of every worker exists. True when the dump is complete."""
    present = set(storage.list())
    missing = [key for key in all_shard_keys(expected) if key not in present]
    if missing:
        log.info("dump: this worker is done; %d shards of other workers still missing (first %s)", len(missing),
                 storage.uri(missing[0]))
        return False
    if MANIFEST not in present:
        storage.write_bytes(MANIFEST, _json(expected))
    log.info("dump: complete, %s", storage.uri(MANIFEST))
    return True


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _progress(total: int):
    """A tqdm bar on a terminal; None elsewhere (then one log line per shard, readable in `kubectl logs`)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="dump", unit="shard")
