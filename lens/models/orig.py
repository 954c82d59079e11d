"""The frozen subject model: capture activations, and next-token logits with an activation patched in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from lens.models.blocks import (KV, LMParts, cache_from, kv_of, logits_at, prefix_kv, read_block_output,
                                replace_block_output, resolve, run_to_block, single_position_mask)


@dataclass
class Unpatched:
    """The one unpatched pass over a batch of contexts: all that the functional KL needs from it."""

    target: torch.Tensor
    """(B, V) fp32 next-token logits at positions[b] of row b."""
    A: torch.Tensor
    """(B, d) fp32 output of block `layer` at those positions."""
    kv: KV
    """Keys/values of positions 0..max(p) (zeros past the last position of a row's group); row b's patched pass
    reads those before positions[b]."""
    current_ids: torch.Tensor
    """(B,) the token at each position."""
    positions: torch.Tensor
    layer: int


def row_groups(positions: torch.Tensor, units: int = 32) -> list[torch.Tensor]:
    """Rows grouped for forwards cut after each group's last position (a forward then costs about rows x (last
    position + 1) tokens): rows sorted by position, in at most `units` runs of equal size, are split where that
    minimises the tokens plus, for each forward, a fixed cost of 1/16 of one forward over all rows. One group of all
    rows, in order, when no split pays."""
    pos = positions.tolist()
    order = sorted(range(len(pos)), key=pos.__getitem__)
    size = -(-len(pos) // units)
    runs = [order[i:i + size] for i in range(0, len(order), size)]
    rows_before = [0]
    for run in runs:
        rows_before.append(rows_before[-1] + len(run))
    per_forward = len(pos) * (max(pos) + 1) / 16
    best = [(0.0, 0)]  # best[j]: (cost, first run of the last group) of runs[:j] split optimally
    for j in range(1, len(runs) + 1):
        tokens = pos[runs[j - 1][-1]] + 1
        best.append(min((best[i][0] + per_forward + (rows_before[j] - rows_before[i]) * tokens, i)
                        for i in range(j)))
    cuts, j = [], len(runs)
    while j > 0:
        cuts.append(best[j][1])
        j = best[j][1]
    if len(cuts) == 1:
        return [torch.arange(len(pos), device=positions.device)]
    bounds = cuts[::-1] + [len(runs)]
    return [torch.tensor(order[rows_before[a]:rows_before[b]], device=positions.device)
            for a, b in zip(bounds, bounds[1:])]


class Orig:
    """A frozen HF causal LM seen through the lens. Not an nn.Module: it owns no trainable state.

    Gradients never reach its weights, but flow through it into patched activations (the functional KL needs that).
    """

    def __init__(self, lm: nn.Module):
        lm.eval().requires_grad_(False)
        self.parts: LMParts = resolve(lm)

    @property
    def lm(self) -> nn.Module:
        return self.parts.lm

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor) -> torch.Tensor:
        """A = output of block `layer` at positions[b] of row b: (B, S) ids, (B,) positions -> (B, d) in fp32.

        Tokens after the last position cannot influence it (causal attention), so they are cut off, and the
        forward stops after block `layer`."""
        ctx = input_ids[:, : int(positions.max()) + 1]
        hidden = run_to_block(self.parts, layer, input_ids=ctx)
        return hidden[torch.arange(len(positions), device=positions.device), positions].float()

    @torch.no_grad()
    def unpatched(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor) -> Unpatched:
        """The unpatched pass over the contexts, with the LM head applied at positions[b] only: target logits, A at
        block `layer` and the KV cache. Causal attention: nothing after a row's position matters, so rows run in
        groups of similar positions (`row_groups`), each forward cut after its group's last position; each group's
        cache lands in one zero-padded batch cache (the patched pass's mask hides what a row must not see)."""
        rows = torch.arange(len(positions), device=positions.device)
        groups = row_groups(positions)
        if len(groups) == 1:
            target, A, kv = self._forward_cut(input_ids, layer, positions)
            return Unpatched(target, A, kv, input_ids[rows, positions], positions, layer)
        target = A = kv = None
        for g in groups:
            t, a, group_kv = self._forward_cut(input_ids[g], layer, positions[g])
            if kv is None:
                longest = int(positions.max()) + 1
                target, A = t.new_empty(len(rows), t.shape[1]), a.new_empty(len(rows), a.shape[1])
                kv = [tuple(x.new_zeros(len(rows), x.shape[1], longest, x.shape[3]) for x in pair) for pair in group_kv]
            target[g], A[g] = t, a
            for pair, group_pair in zip(kv, group_kv):
                for x, x_g in zip(pair, group_pair):
                    x[g, :, : x_g.shape[2]] = x_g
        return Unpatched(target, A, kv, input_ids[rows, positions], positions, layer)

    def _forward_cut(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor):
        """(target logits (B, V), A (B, d), KV) of one forward over the contexts cut after the last position."""
        ctx = input_ids[:, : int(positions.max()) + 1]
        cache, acts = DynamicCache(), []
        with logits_at(self.parts, positions), read_block_output(self.parts, layer, positions, acts):
            logits = self.lm(input_ids=ctx, use_cache=True, **{self.parts.cache_kwarg: cache}).logits[:, 0]
        return logits.float(), acts[0].float(), kv_of(cache)

    def patched(self, run: Unpatched, new_acts: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) fp32 at positions[b] of row b with the output of block `layer` there replaced by
        new_acts[b] (B, d): gradients flow into `new_acts`.

        Causal attention: the replacement changes nothing before p, so this is one token per row through the
        model's own forward (explicit position ids, a mask that shows row b its own cached positions < p) over the
        unpatched pass's keys and values. Blocks up to `layer` see the token at p; their output is then replaced."""
        cached = run.kv[0][0].shape[2]
        mask = single_position_mask(self.parts, run.positions, cached, self.parts.embed.weight.dtype)
        first = torch.zeros_like(run.positions)  # the token's index within this one-token pass
        with replace_block_output(self.parts, run.layer, first, new_acts):
            out = self.lm(input_ids=run.current_ids[:, None], position_ids=run.positions[:, None],
                          attention_mask=mask, use_cache=True, **{self.parts.cache_kwarg: cache_from(run.kv)})
        return out.logits[:, -1].float()

    def patched_logits(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor,
                       new_acts: torch.Tensor | None) -> torch.Tensor:
        """`unpatched` then `patched` in one call: the logits at positions[b] with `new_acts` patched in (None: the
        unpatched logits). Callers that need both share one `unpatched` run instead."""
        run = self.unpatched(input_ids, layer, positions)
        return run.target if new_acts is None else self.patched(run, new_acts)

    @torch.no_grad()
    def continuation_logits(self, prefix_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits that predict ids[:, t] after `prefix_ids` (P,) and ids[:, :t]: (B, T) -> (B, T, V).

        The fluency KL and the GRPO KL score an explanation under a natural prefix with these. The prefix is the
        same for every row: all of it but its last token (whose logits predict ids[:, 0]) runs once, one row."""
        B, prefix_ids = ids.shape[0], prefix_ids.to(ids.device)
        shared = prefix_ids[:-1]
        kv = prefix_kv(self.parts, self.parts.n_layers - 1, input_ids=shared[None]) if len(shared) else []
        ctx = torch.cat([prefix_ids[-1:].expand(B, 1), ids[:, :-1]], dim=1)
        return self.lm(input_ids=ctx, use_cache=True, logits_to_keep=ids.shape[1],
                       **{self.parts.cache_kwarg: cache_from(kv, rows=B)}).logits.float()
