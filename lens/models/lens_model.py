"""The lens: frozen orig model + trainable decoder and encoder, built from one config."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lens.config import LensConfig, check_against_model
from lens.models.decoder import Decoder
from lens.models.encoder import Encoder
from lens.models.orig import Orig
from lens.models.prompt import prompt_ids

# Parameter roles for optimizer groups (optim.lr_mult); a name's role is decided by its first matching part.
ROLES = ("proj", "prompt", "base")


def param_role(name: str) -> str:
    """'decoder.proj.weight' -> 'proj'; 'encoder.prompt_left' -> 'prompt'; 'decoder.lm.*' -> 'base'."""
    part = name.split(".")[1]
    if part in ("proj", "layer_proj", "out", "last"):
        return "proj"
    if part.startswith("prompt_"):
        return "prompt"
    if part == "lm":
        return "base"
    raise ValueError(f"no optimizer role for parameter {name}")


def activation_scale(orig: Orig, acts: torch.Tensor) -> float:
    """Median token-embedding norm / median activation norm: the decoder's projection starts at this scale."""
    emb = orig.parts.embed_ids(torch.arange(orig.parts.vocab_size, device=acts.device)).float()
    return float(emb.norm(dim=-1).median() / acts.float().norm(dim=-1).median())


class LensModel(nn.Module):
    """Decoder and encoder (the trainables) plus the frozen `orig` they explain and patch into."""

    def __init__(self, cfg: LensConfig, lm: nn.Module, tokenizer, act_scale: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.orig = Orig(lm)  # a plain object: its weights are not parameters of the lens
        check_against_model(cfg, self.orig.parts.n_layers, self.orig.parts.d_model)
        self.decoder = Decoder(self._base(lm, cfg.decoder.train_base), tokenizer, cfg.decoder, act_scale)
        self.encoder = Encoder(self._base(lm, cfg.encoder.train_base), tokenizer, cfg.encoder, cfg.encoder_layer)
        # ids of loss.lm_prefix, under which the LM scores explanations (a buffer: follows the model's device)
        self.register_buffer("lm_prefix_ids", prompt_ids(tokenizer, cfg.loss.lm_prefix), persistent=False)

    @staticmethod
    def _base(lm: nn.Module, train: bool) -> nn.Module:
        """The orig weights themselves when frozen (no copy, no memory), an fp32 trainable copy otherwise."""
        if not train:
            return lm
        own = copy.deepcopy(lm).float()
        # Stays in eval mode: no dropout, so every random choice is keyed by the sample (lens.rng).
        return own.eval().requires_grad_(True)

    @property
    def layer(self) -> int:
        return self.cfg.model.layer

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, fp32, detached, by name (checkpoints hold these, through DCP)."""
        return {n: p.detach().float().contiguous() for n, p in self.trainable_parameters().items()}
