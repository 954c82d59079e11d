"""Which sample comes next: the global sample cursor, each rank's share of a batch, and on-the-fly lookup.

Training draws samples by **global sample index** g = 0, 1, 2, ... counted from the start of training across epochs.
With N training sequences, g belongs to epoch e = g // N and is entry i = g % N of that epoch's seeded permutation
`rng.Permutation(N, seed, rng.PERMUTATION, e)`; its explained position is drawn from the key
`(seed, rng.POSITION, g)`. So sample g is a pure function of (seed, g, corpus): it does not depend on the number of
ranks, the batch it falls in, or how often the job restarted. The cursor only has to remember the next g.

Activations are captured elsewhere (the trainer runs the model); this module returns token ids and positions.
"""

from __future__ import annotations

import math

import torch

from lens import rng
from lens.data.corpus import Corpus, position_range, sample_positions


class SampleCursor:
    """The next unseen global sample index; world-size independent, so a resized job resumes exactly."""

    def __init__(self, next_index: int = 0):
        self.next = next_index

    def take(self, n: int) -> torch.Tensor:
        """The next n global sample indices, LongTensor (n,), and advance past them."""
        ids = torch.arange(self.next, self.next + n, dtype=torch.int64)
        self.next += n
        return ids

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = int(state["next"])


def split_for_rank(global_ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch. Shares differ in size by at most 1 (the first
    `len % world` ranks get one more); concatenated in rank order they are the batch, each sample once."""
    base, extra = divmod(len(global_ids), world)
    start = rank * base + min(rank, extra)
    return global_ids[start: start + base + (rank < extra)]


class EpochOrder:
    """Which training sequence each global sample index reads: entry g % N of epoch g // N's seeded permutation.
    Shared by the on-the-fly and the dumped sources, so both walk the data in the same order. Permutations are
    evaluated per index (`rng.Permutation`): memory does not grow with N."""

    def __init__(self, n_train: int, seed: int):
        self.n_train, self.seed = n_train, seed

    def rows(self, global_ids: torch.Tensor) -> torch.Tensor:
        """(n,) global sample indices -> (n,) training sequence indices. A batch may straddle epochs."""
        epochs, index = global_ids // self.n_train, global_ids % self.n_train
        rows = torch.empty_like(global_ids)
        for e in epochs.unique().tolist():
            here = epochs == e
            rows[here] = rng.Permutation(self.n_train, self.seed, rng.PERMUTATION, e)(index[here])
        return rows


class OnTheFlySource:
    """Token ids and explained positions of global samples, read from a tokenised corpus."""

    def __init__(self, corpus: Corpus, seed: int, min_pos: int):
        self.corpus, self.seed, self.min_pos = corpus, seed, min_pos
        position_range(corpus.first, corpus.seq_len, min_pos)  # a bad min_pos fails now, not at the first batch
        self.order = EpochOrder(len(corpus.train), seed)

    @property
    def n_train(self) -> int:
        return len(self.corpus.train)

    def close(self) -> None:
        """Nothing to release (the dumped source stops its prefetch threads here)."""

    def steps_per_epoch(self, global_batch: int) -> int:
        """Optimizer steps per pass over the training set: ceil(N / global_batch)."""
        return math.ceil(self.n_train / global_batch)

    def lookup(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples by global index: input_ids LongTensor (n, seq_len) and positions LongTensor (n,).
        The batch may straddle epochs."""
        seq = self.order.rows(global_ids)
        keys = rng.key(self.seed, rng.POSITION, global_ids)
        positions = sample_positions(keys, self.corpus.first, self.corpus.seq_len, self.min_pos)
        return self.corpus.train[seq], positions

    def val_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed held-out set: the first n validation sequences (cycling when there are fewer), positions keyed
        by (seed, rng.VAL_POSITION, j). Same n, same seed -> same batch. Shapes as in `lookup`."""
        j = torch.arange(n, dtype=torch.int64)
        keys = rng.key(self.seed, rng.VAL_POSITION, j)
        positions = sample_positions(keys, self.corpus.first, self.corpus.seq_len, self.min_pos)
        return self.corpus.val[j % len(self.corpus.val)], positions
