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
    """Keys/values of positions 0..max(p) of every row; row b's patched pass reads those before positions[b]."""
    current_ids: torch.Tensor
    """(B,) the token at each position."""
    positions: torch.Tensor
    layer: int


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
        """One forward over the contexts, cut after the last position needed (causal: nothing later matters),
        with the LM head applied at positions[b] only: target logits, A at block `layer` and the KV cache."""
        rows = torch.arange(len(positions), device=positions.device)
        ctx = input_ids[:, : int(positions.max()) + 1]
        cache, acts = DynamicCache(), []
        with logits_at(self.parts, positions), read_block_output(self.parts, layer, positions, acts):
            logits = self.lm(input_ids=ctx, use_cache=True, **{self.parts.cache_kwarg: cache}).logits[:, 0]
        return Unpatched(logits.float(), acts[0].float(), kv_of(cache), input_ids[rows, positions], positions, layer)

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
