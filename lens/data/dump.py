"""`lens dump`: capture activations of a corpus into safetensors shards, plus a manifest written last.

What dump sample i of a split is (a pure function of config and corpus, so any worker, rerun or index split writes
the same bytes for it):
  * train: training sequence i, explained position `sample_positions(key(seed, POSITION, i))`;
  * val: validation sequence i, position keyed by `(seed, VAL_POSITION, i)`;
  * with `loss.resample_ablation`, A' of sample i comes from sequence (i + N // 2) % N of the same split (another
    context whenever N >= 2), at a position keyed by `(seed, RESAMPLE, i)`.
Training does not read the dump in this order: `ShardSource` applies the per-epoch permutation on top.

Phase 1 is the token store (`lens/data/tokens.py`): each worker tokenizes its share of the corpus, then waits for
the others' (with data.on_the_fly=true that is all `lens dump` does: the data Job of an on-the-fly run). Phase 2:
shards are numbered train first, then val, and worker `index` of `count` (a Kubernetes Indexed Job's pod) writes
the shards j with j % count == index, every block of `data.layers` from one forward (early exit after the deepest).
Each shard is captured in batches that depend only on the shard, published atomically, and skipped when it already
exists and loads with the shapes the manifest implies, so a killed worker just runs again and a rerun rewrites a
corrupt or missing shard. Whichever worker finds every shard present writes `manifest.json`; its content does not
depend on who writes it. See `lens/data/shards.py` for the layout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lens import rng
from lens.config import LensConfig, check_against_model
from lens.data.corpus import Corpus, sample_positions
from lens.data.shards import MANIFEST, PLAN, SPLITS, all_shard_keys, check_shard, dump_layers, expected_manifest, \
    manifest_mismatch, read_json, shard_key
from lens.errors import InputError
from lens.models.blocks import read_block_output
from lens.models.hub import DTYPES, load_model_for
from lens.models.orig import Orig
from lens.storage import Storage, open_storage

log = logging.getLogger(__name__)


@dataclass
class SplitSamples:
    """Everything needed to capture the samples of one split: its (N, seq_len) rows and (N,) positions, and the rows
    and positions of their A' contexts when resample ablation is on. Rows are read per shard (`rows[lo:hi]`)."""

    rows: object  # `SequenceView` (or tensor) of the split's sequences
    token_pos: torch.Tensor
    prime_rows: torch.Tensor | None = None  # (N,) row of each sample's A' context
    token_pos_prime: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


def split_samples(corpus: Corpus, split: str, seed: int, min_pos: int, prime: bool) -> SplitSamples:
    """The dump samples of `split` (module docstring), in dump order."""
    tokens = corpus.train if split == "train" else corpus.val
    n = len(tokens)
    i = torch.arange(n, dtype=torch.int64)
    stream = rng.POSITION if split == "train" else rng.VAL_POSITION
    samples = SplitSamples(tokens, sample_positions(rng.key(seed, stream, i), corpus.first, corpus.seq_len, min_pos))
    if prime:
        samples.prime_rows = (i + n // 2) % n
        samples.token_pos_prime = sample_positions(rng.key(seed, rng.RESAMPLE, i), corpus.first, corpus.seq_len,
                                                   min_pos)
    return samples


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
    """Write this worker's share of the token store, then of the activation dump described by `cfg` into
    `cfg.data.activations` (with data.on_the_fly=true, only the token store).

    Returns True when the whole dataset (all workers) is complete and its manifest written. Raises `InputError`
    (before writing anything) for an unusable target, an unloadable model, or a target holding another dump."""
    index, count = worker_slot(index, count)
    if not cfg.data.on_the_fly and not cfg.data.activations:
        raise InputError("data.activations is not set; expected the dump target (a local path or s3://bucket/prefix)")
    storage = None
    if not cfg.data.on_the_fly:
        storage = open_storage(cfg.data.activations, cfg.storage.endpoint_url)
        storage.check()  # a missing bucket or bad credentials fail now, not after the model has loaded
    lm, tokenizer = load_model_for(cfg)
    d_model = lm.config.hidden_size
    check_against_model(cfg, lm.config.num_hidden_layers, d_model)
    corpus = Corpus.build(cfg.data, tokenizer, cfg.storage.endpoint_url, index, count, build_here=True)
    if storage is None:
        log.info("dump: token store complete (data.on_the_fly=true: no activations to dump)")
        return True
    expected = expected_manifest(cfg, corpus, tokenizer, d_model)
    complete = _claim(storage, expected)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    orig = Orig(lm.to(device))
    todo = [(split, s) for split in SPLITS for s in range(expected["splits"][split]["shards"])]
    mine = [job for j, job in enumerate(todo) if j % count == index]
    samples = {split: split_samples(corpus, split, cfg.run.seed, cfg.data.min_pos, cfg.loss.resample_ablation)
               for split in SPLITS}
    log.info("dump: worker %d of %d, %d of %d shards -> %s%s", index, count, len(mine), len(todo), storage.uri(),
             " (complete: verifying)" if complete else "")
    bar = _progress(len(mine))
    rewritten = 0
    for k, (split, shard) in enumerate(mine, 1):
        key = shard_key(split, shard)
        start = time.perf_counter()
        problem = shard_problem(storage, key, expected, split, shard, verify=complete)
        if problem is None:
            status = "exists, skipped"
        else:
            if complete:
                log.warning("dump: %s %s; rewriting it", storage.uri(key), problem)
                rewritten += 1
            write_shard(storage, key, orig, samples[split], shard, cfg, device)
            status = f"written in {time.perf_counter() - start:.1f} s"
        if bar is not None:
            bar.update(1)
        else:
            log.info("dump: shard %d/%d %s %s", k, len(mine), storage.uri(key), status)
    if bar is not None:
        bar.close()
    if complete:
        log.info("dump: %s is already complete; %d of this worker's %d shards verified, %d rewritten",
                 storage.uri(MANIFEST), len(mine) - rewritten, len(mine), rewritten)
        return True
    return finish(storage, expected)


def shard_problem(storage: Storage, key: str, expected: dict, split: str, shard: int, verify: bool) -> str | None:
    """Why shard `key` must be (re)written, or None. Shards are published atomically, so while the dump is under
    way an existing one is complete; once the manifest says the dump is complete (`verify`), a rerun reads each
    shard, so that one corrupted or deleted since is rewritten."""
    if not verify:
        return None if storage.exists(key) else "is missing"
    try:
        data = storage.read_bytes(key)
    except FileNotFoundError:
        return "is missing"
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled bytes
        return f"is corrupt ({type(e).__name__})"
    problem = check_shard(tensors, expected, split, shard, expected["layers"])
    return None if problem is None else f"is corrupt: {problem}"


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
    """Capture samples [shard * shard_size, ...) of one split, every dumped layer from one forward, and publish
    them as one safetensors object."""
    lo = shard * cfg.data.shard_size
    hi = min(lo + cfg.data.shard_size, len(samples))
    dtype, layers = DTYPES[cfg.model.dtype], dump_layers(cfg)
    tensors = {"input_ids": samples.rows[lo:hi].contiguous(), "token_pos": samples.token_pos[lo:hi].contiguous()}
    for layer, A in capture(orig, tensors["input_ids"], tensors["token_pos"], layers, cfg.data.dump_batch_size,
                            device).items():
        tensors[f"A.{layer}"] = A.to(dtype)
    if samples.prime_rows is not None:
        tensors["input_ids_prime"] = samples.rows[samples.prime_rows[lo:hi]].contiguous()
        tensors["token_pos_prime"] = samples.token_pos_prime[lo:hi].contiguous()
        for layer, A in capture(orig, tensors["input_ids_prime"], tensors["token_pos_prime"], layers,
                                cfg.data.dump_batch_size, device).items():
            tensors[f"A_prime.{layer}"] = A.to(dtype)
    storage.write_bytes(key, save_safetensors(tensors, metadata={"first_sample": str(lo)}))


def capture(orig: Orig, input_ids: torch.Tensor, positions: torch.Tensor, layers: list[int], batch_size: int,
            device: torch.device) -> dict[int, torch.Tensor]:
    """The output of each block in `layers` at each row's position, (n, seq_len) ids and (n,) positions -> {layer:
    (n, d) fp32 on CPU}.

    Batches of `batch_size` rows, each cut after its own last position; one forward per batch, stopped after the
    deepest layer (`Orig.capture`) while `read_block_output` reads the others; bf16 autocast on GPU."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    *shallow, deepest = sorted(layers)
    for s in range(0, len(input_ids), batch_size):
        ids, pos = input_ids[s:s + batch_size].to(device), positions[s:s + batch_size].to(device)
        read: dict[int, list[torch.Tensor]] = {layer: [] for layer in shallow}  # this batch's, on the device
        with contextlib.ExitStack() as hooks, torch.no_grad(), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for layer in shallow:
                hooks.enter_context(read_block_output(orig.parts, layer, pos, read[layer]))
            out[deepest].append(orig.capture(ids, deepest, pos).float().cpu())
        for layer in shallow:
            out[layer] += [A.float().cpu() for A in read[layer]]
    return {layer: torch.cat(t) if t else torch.empty(0) for layer, t in out.items()}


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
