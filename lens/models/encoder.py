"""Encoder: explanation -> reconstructed activation A_hat."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lens.config import EncoderConfig
from lens.models.blocks import cache_from, prefix_kv, resolve, run_to_block
from lens.models.decoder import identity_linear
from lens.models.prompt import split_prompt


class Encoder(nn.Module):
    """Reads `[left prompt | explanation | right prompt | (token at p)]`, adds a learned vector at the last
    position, stops after block `layer` and maps that block's last-position output through an affine read-out.

    The left prompt is the same for every row: its keys/values are computed once per forward (one row) and
    broadcast."""

    def __init__(self, lm: nn.Module, tokenizer, cfg: EncoderConfig, layer: int,
                 embed: Callable[[torch.Tensor], torch.Tensor]):
        """`embed`: token ids -> embeddings as `lm` computes them (`lm` may have no weights yet), where the prompts
        start."""
        super().__init__()
        self.lm = lm
        self.parts = resolve(lm)
        self.layer = layer
        self.use_current_token = cfg.use_current_token
        d = self.parts.d_model
        left, right = split_prompt(tokenizer, cfg.prompt, "<text>")
        with torch.no_grad():
            self.prompt_left = nn.Parameter(embed(left).float().clone())
            self.prompt_right = nn.Parameter(embed(right).float().clone())
        self.last = nn.Parameter(torch.zeros(d))
        self.out = identity_linear(d)

    def features(self, text_embeds: torch.Tensor, current_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, T, d) explanation embeddings (T may be 0), (B,) ids of the token at p or None -> (B, d): block
        `layer`'s output at the last position, before the read-out."""
        B, dtype = text_embeds.shape[0], self.parts.embed.weight.dtype
        shared = self.prompt_left
        pieces = [text_embeds, self.prompt_right.expand(B, -1, -1)]
        if current_ids is not None:
            pieces.append(self.parts.embed_ids(current_ids).float().unsqueeze(1))
        x = torch.cat(pieces, dim=1)
        if x.shape[1] == 0:  # nothing per row: the last prompt token is the one that gets the learned vector
            shared, x = shared[:-1], shared[-1:].expand(B, -1, -1)
        x = torch.cat([x[:, :-1], x[:, -1:] + self.last], dim=1)
        kv = prefix_kv(self.parts, self.layer, inputs_embeds=shared[None].to(dtype)) if len(shared) else []
        hidden = run_to_block(self.parts, self.layer, cache=cache_from(kv, rows=B), inputs_embeds=x.to(dtype))
        return hidden[:, -1].float()

    def forward(self, text_embeds: torch.Tensor, current_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) explanation embeddings -> (B, d) A_hat."""
        return self.out(self.features(text_embeds, current_ids if self.use_current_token else None))
