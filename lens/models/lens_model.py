"""The lens: frozen orig model + trainable decoder and encoder, built from one config."""

from __future__ import annotations

import copy
from typing import Callable

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

    def __init__(self, cfg: LensConfig, lm: nn.Module, tokenizer, act_scale: float = 1.0, deferred: bool = False):
        """`deferred`: the trainable copies keep no weights until `materialise` (the trainer shards them first)."""
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.orig = Orig(lm)  # a plain object: its weights are not parameters of the lens
        check_against_model(cfg, self.orig.parts.n_layers, self.orig.parts.d_model)
        self.decoder = Decoder(self._base(lm, cfg.decoder.train_base), tokenizer, cfg.decoder, act_scale,
                               self._embedder(cfg.decoder.train_base))
        self.encoder = Encoder(self._base(lm, cfg.encoder.train_base), tokenizer, cfg.encoder, cfg.encoder_layer,
                               self._embedder(cfg.encoder.train_base))
        # ids of loss.lm_prefix, under which the LM scores explanations (a buffer: follows the model's device)
        self.register_buffer("lm_prefix_ids", prompt_ids(tokenizer, cfg.loss.lm_prefix), persistent=False)
        if not deferred:
            self.materialise()

    @staticmethod
    def _base(lm: nn.Module, train: bool) -> nn.Module:
        """The orig weights themselves when frozen (no copy, no memory), an fp32 trainable copy otherwise: built on
        the meta device (shapes only, buffers copied as they are) and given its weights by `materialise`, so no
        full fp32 copy exists before the trainer has sharded it."""
        if not train:
            return lm
        empty = {id(p): nn.Parameter(torch.empty_like(p, device="meta", dtype=torch.float32)) for p in lm.parameters()}
        own = copy.deepcopy(lm, empty).float()
        # Stays in eval mode: no dropout, so every random choice is keyed by the sample (lens.rng).
        return own.eval().requires_grad_(True)

    def _embedder(self, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """Token ids -> embeddings as a base computes them: where its prompts start. The orig's embedding module,
        on an fp32 table for a trainable copy (which has no weights yet; the table lives for the call only)."""
        embed = self.orig.parts.embed

        def run(ids: torch.Tensor) -> torch.Tensor:
            weight = embed.weight.float() if train else embed.weight
            return torch.func.functional_call(embed, {"weight": weight}, (ids.to(weight.device),))

        return run

    @torch.no_grad()
    def materialise(self) -> None:
        """Give the trainable copies the orig's weights in fp32, on the orig's device, in the layout each parameter
        has by now: a sharded one (FSDP2 on the meta device) gets only this rank's part, sliced from the orig's
        tensor, so no rank holds a full fp32 copy. Tied weights are one parameter: filled once, tied still."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        source = dict(self.orig.lm.named_parameters(remove_duplicate=False))
        copies = [base for base in (self.decoder.lm, self.encoder.lm) if base is not self.orig.lm]
        for base in copies:
            for name, p in base.named_parameters():
                if not p.is_meta:  # filled already
                    continue
                value = source[name].detach()
                if isinstance(p, DTensor):  # no communication: every rank slices its own part
                    value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                value = value.to(p.dtype, copy=True)  # never a view of the frozen weights
                # In place (the same Parameter object): FSDP's records of it and the ties between modules hold.
                torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))

    @property
    def layer(self) -> int:
        return self.cfg.model.layer

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, fp32, detached, by name (checkpoints hold these, through DCP)."""
        return {n: p.detach().float().contiguous() for n, p in self.trainable_parameters().items()}
