"""Samples with their activations, by global sample id: the one place that turns ids into `Batch`es.

The trainer and `lens eval` / `lens explain` all read through `ActivationData`, so the held-out set `lens eval`
scores is, sample for sample, the one training evaluated on.
"""

from __future__ import annotations

import torch

from lens.config import LensConfig
from lens.data.corpus import Corpus
from lens.data.shards import ShardSource
from lens.data.source import OnTheFlySource
from lens.models.orig import Orig
from lens.objective import Batch


class ActivationData:
    """Training and held-out samples of one config on `device`: activations read from the dump
    (`data.on_the_fly: false`) or captured now with `orig`."""

    def __init__(self, cfg: LensConfig, orig: Orig, tokenizer, device: torch.device):
        self.cfg, self.orig, self.device = cfg, orig, device
        # The token store: built here when it is this machine's cache, else waited for (the data Job writes it).
        corpus = Corpus.build(cfg.data, tokenizer, cfg.storage.endpoint_url)
        if cfg.data.on_the_fly:
            self.source = OnTheFlySource(corpus, cfg.run.seed, cfg.data.min_pos)
        else:  # activations dumped by `lens dump` (waited for); every manifest field is checked against this config
            self.source = ShardSource.from_config(cfg, corpus, tokenizer, d_model=orig.parts.d_model)

    @property
    def n_train(self) -> int:
        return self.source.n_train

    def batch(self, global_ids: torch.Tensor, held_out: bool = False, capture: bool = True) -> Batch:
        """The samples with these global ids (held out: the first n of the validation split), with activations.
        On the fly with `capture=False`, A is left None: the training objective takes it from its own unpatched pass
        over the same contexts, so no forward here."""
        fetched = self.source.val_batch(len(global_ids)) if held_out else self.source.lookup(global_ids)
        ids, positions, *acts = (t.to(self.device) if t is not None else None for t in fetched)
        A, A_prime = acts if acts else (None, None)
        if A is None and capture:
            A = self.orig.capture(ids, self.cfg.model.layer, positions)
        prime_ids = None
        if A_prime is not None and self.cfg.loss.resample_ablation and not held_out:
            ctx, pos = self.source.lookup_prime(global_ids)
            prime_ids = ctx[torch.arange(len(pos)), pos].to(self.device)
        return Batch(ids, positions, None if A is None else A.float(), global_ids.to(self.device),
                     None if A_prime is None else A_prime.float(), prime_ids)

    def eval_sets(self, n: int) -> tuple[Batch, Batch]:
        """`n` held-out samples (validation split) and as many training ones for the baselines' fits."""
        held_out = self.batch(-1 - torch.arange(n), held_out=True)  # negative ids: keys apart from training ones
        fit = self.batch(torch.arange(min(n, self.n_train)))
        return held_out, fit

    def close(self) -> None:
        self.source.close()
