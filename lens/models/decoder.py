"""Decoder: activation -> explanation text.

One prefix builder (`prefix`), one generation loop (`generate`: straight-through Gumbel-softmax or hard sampling,
with or without a KV cache) and one teacher-forced scorer (`score`) built on the same prefix and slot patching.
The prompt left of the slot is the same for every row: its keys/values are computed once per forward (one row,
with gradients, since the prompt is trainable) and broadcast to the batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lens import rng
from lens.config import DecoderConfig
from lens.models.blocks import before_blocks, cache_from, contiguous_head_input, kv_of, prefix_kv, resolve
from lens.models.prompt import split_prompt


@dataclass
class Generation:
    ids: torch.Tensor
    """(B, T) token ids of the explanation."""
    embeds: torch.Tensor
    """(B, T, d) input embeddings of those tokens (straight-through: differentiable w.r.t. the logits)."""
    logits: torch.Tensor
    """(B, T, V) fp32 logits each token was drawn from."""


def identity_linear(d: int, scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(d, d)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d) * scale)
        layer.bias.zero_()
    return layer


class Decoder(nn.Module):
    """Reads A through `[left prompt | proj(A) | right prompt]` and writes `t_text` tokens."""

    def __init__(self, lm: nn.Module, tokenizer, cfg: DecoderConfig, act_scale: float,
                 embed: Callable[[torch.Tensor], torch.Tensor]):
        """`act_scale`: typical token-embedding norm / typical activation norm, so proj(A) starts at the scale of
        a token embedding. `embed`: token ids -> embeddings as `lm` computes them (`lm` may have no weights yet),
        where the prompts start."""
        super().__init__()
        self.lm = lm
        self.parts = resolve(lm)
        d = self.parts.d_model
        left, right = split_prompt(tokenizer, cfg.prompt, "<embed>")
        with torch.no_grad():
            self.prompt_left = nn.Parameter(embed(left).float().clone())  # (P_l, d)
            self.prompt_right = nn.Parameter(embed(right).float().clone())  # (P_r, d)
        self.proj = identity_linear(d, act_scale)
        self.slot = len(left)
        self.n_patch = self.parts.n_layers if cfg.patch_layers == -1 else cfg.patch_layers
        n_own = self.n_patch if cfg.per_layer_proj else 0
        self.layer_proj = nn.ModuleList(identity_linear(d, act_scale) for _ in range(n_own))

    def prefix(self, A: torch.Tensor) -> torch.Tensor:
        """(B, d) activations -> (B, P, d) prefix embeddings."""
        B = A.shape[0]
        slot = self.proj(A).unsqueeze(1)
        return torch.cat([self.prompt_left.expand(B, -1, -1), slot, self.prompt_right.expand(B, -1, -1)], dim=1)

    def _slot_patch(self, A: torch.Tensor, index: int):
        """Overwrite the residual at `index` (where the slot sits in this pass's input) before each of the first
        `n_patch` blocks."""
        if self.n_patch == 0:
            return nullcontext()

        def overwrite(i: int, hidden: torch.Tensor) -> torch.Tensor:
            proj = self.layer_proj[i] if len(self.layer_proj) else self.proj
            hidden = hidden.clone()
            hidden[:, index] = proj(A).to(hidden.dtype)
            return hidden

        return before_blocks(self.parts, self.n_patch, overwrite)

    def _left_cache(self, rows: int):
        """A cache holding the left prompt's keys/values, computed for one row and broadcast to `rows`."""
        embeds = self.prompt_left[None].to(self.parts.embed.weight.dtype)
        kv = prefix_kv(self.parts, self.parts.n_layers - 1, inputs_embeds=embeds) if self.slot else []
        return cache_from(kv, rows=rows)

    def _forward(self, A: torch.Tensor, embeds: torch.Tensor, cache, slot: int | None,
                 keep: int = 1) -> torch.Tensor:
        """Run the LM on `embeds` (patching the slot at index `slot` when this pass holds it); fp32 logits of the
        last `keep` positions."""
        with self._slot_patch(A, slot) if slot is not None else nullcontext(), contiguous_head_input(self.parts):
            out = self.lm(inputs_embeds=embeds.to(self.parts.embed.weight.dtype), use_cache=cache is not None,
                          logits_to_keep=keep, **{self.parts.cache_kwarg: cache})
        return out.logits.float()

    def generate(self, A: torch.Tensor, t_text: int, keys: torch.Tensor, *, tau: float = 1.0, hard: bool = False,
                 temperature: float = 1.0, use_cache: bool = True, group: int = 1) -> Generation:
        """Generate `t_text` tokens for each activation in A (B, d).

        `keys` (B,) int64: randomness of row b is Gumbel noise keyed by (keys[b], step), so it does not depend on
        batch composition. Soft mode (`hard=False`): straight-through Gumbel-softmax at temperature `tau`, the
        forward value is the one-hot sample and gradients flow through the softmax. Hard mode: Gumbel-max sampling
        at `temperature` (an exact sample of softmax(logits / temperature)); the samples carry no gradient, the
        logits keep theirs (under grad mode), so a policy gradient needs no second, teacher-forced pass.
        `group`: rows come in runs of `group` with the same A (GRPO's members); the prefix, and so the first
        token's logits, is computed once per run and its keys/values broadcast."""
        A_run = A[::group]
        prefix = self.prefix(A_run)
        cache = self._left_cache(A_run.shape[0]) if use_cache else None
        ids, inputs, logits = [], [], []  # inputs: the tokens' embeddings as this LM reads them back
        step_input = prefix[:, self.slot:]  # the slot and the right prompt: the left one is in the cache
        for t in range(t_text):
            if use_cache:
                logits_t = self._forward(A_run, step_input, cache, slot=0 if t == 0 else None)[:, -1]
                if t == 0 and group > 1:
                    logits_t = logits_t.repeat_interleave(group, 0)
                    cache = cache_from([(k.repeat_interleave(group, 0), v.repeat_interleave(group, 0))
                                        for k, v in kv_of(cache)])
            else:  # recompute the whole sequence: the reference the cached path must equal
                full = torch.cat([prefix.repeat_interleave(group, 0), *inputs], dim=1)
                logits_t = self._forward(A, full, None, slot=self.slot)[:, -1]
            noise = rng.gumbel(rng.key(keys, t), logits_t.shape[-1])
            if hard:
                id_t = torch.argmax(logits_t.detach() / temperature + noise, dim=-1)
                emb_t = self.parts.embed_ids(id_t).float()
            else:
                soft = torch.softmax((logits_t + noise) / tau, dim=-1)
                id_t = soft.argmax(dim=-1)
                emb_t = self.parts.embed_straight_through(id_t, soft).float()
            ids.append(id_t)
            inputs.append(emb_t.unsqueeze(1))
            logits.append(logits_t)
            step_input = inputs[-1]
        embeds = torch.cat(inputs, 1)
        # hard samples reach the encoder as plain tokens: no gradient into a trainable base's embeddings
        return Generation(torch.stack(ids, 1), embeds.detach() if hard else embeds, torch.stack(logits, 1))

    def score(self, A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced: (B, T, V) fp32 logits that predict ids[:, t] after the prefix and ids[:, :t]."""
        inputs = torch.cat([self.prefix(A)[:, self.slot:], self.parts.embed_ids(ids[:, :-1]).float()], dim=1)
        return self._forward(A, inputs, self._left_cache(A.shape[0]), slot=0, keep=ids.shape[1])
