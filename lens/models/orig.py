"""The frozen subject model: capture activations, and next-token logits with an activation patched in."""

from __future__ import annotations

import torch
from torch import nn

from lens.models.blocks import LMParts, logits_at, replace_block_output, resolve, run_to_block


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

    def patched_logits(self, input_ids: torch.Tensor, layer: int, positions: torch.Tensor,
                       new_acts: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits at positions[b] of row b, (B, V) in fp32, with the output of block `layer` at those
        positions replaced by `new_acts` (B, d) (None: the unpatched logits). The context is truncated to the last position needed:
        identical logits, less work."""
        ctx = input_ids[:, : int(positions.max()) + 1]
        with logits_at(self.parts, positions):
            if new_acts is None:
                return self.lm(input_ids=ctx, use_cache=False).logits[:, 0].float()
            with replace_block_output(self.parts, layer, positions, new_acts):
                return self.lm(input_ids=ctx, use_cache=False).logits[:, 0].float()

    @torch.no_grad()
    def continuation_logits(self, prefix_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits that predict ids[:, t] after `prefix_ids` (P,) and ids[:, :t]: (B, T) -> (B, T, V).

        The fluency KL and the GRPO KL score an explanation under a natural prefix with these."""
        ctx = torch.cat([prefix_ids.to(ids.device).expand(ids.shape[0], -1), ids[:, :-1]], dim=1)
        return self.lm(input_ids=ctx, use_cache=False, logits_to_keep=ids.shape[1]).logits.float()
