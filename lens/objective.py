"""The training objective: runs the lens on a batch and weights the loss terms (ALGORITHM.md §2), in one place.

Two objectives share this module: the straight-through Gumbel objective (MSE, functional KL, fluency KL,
entropy) and GRPO (hard-sampled explanations; decoder by the policy term, encoder by MSE). Every term is returned
per sample so the trainer can log it; terms whose weight is 0 are computed without gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from lens import losses, rng
from lens.models.lens_model import LensModel
from lens.models.orig import Unpatched


@dataclass
class Batch:
    input_ids: torch.Tensor
    """(B, S) contexts."""
    positions: torch.Tensor
    """(B,) token positions p."""
    A: torch.Tensor | None
    """(B, d) activations at (model.layer, p): dumped ones, or None on the fly (the objective's unpatched pass over
    the contexts yields them)."""
    sample_ids: torch.Tensor
    """(B,) global sample indices: key every random choice of a sample."""
    A_prime: torch.Tensor | None = None
    """(B, d) activations from other contexts, for the resample ablation."""
    prime_ids: torch.Tensor | None = None
    """(B,) the token each A' sits on (the encoder's current token for A')."""

    def current_ids(self) -> torch.Tensor:
        return self.input_ids[torch.arange(len(self.positions), device=self.positions.device), self.positions]


@dataclass
class Knobs:
    """Scheduled values at the current step."""

    tau: float = 1.0
    alpha: float = 1.0
    entropy_mult: float = 1.0


def _grad_if(on: bool):
    return nullcontext() if on else torch.no_grad()


def gumbel_keys(seed: int, sample_ids: torch.Tensor, member: int = 0) -> torch.Tensor:
    return rng.key(seed, rng.GUMBEL, sample_ids, member)


@dataclass
class Explained:
    """The activations a micro-batch explained and the lens's reconstructions of them."""

    A: torch.Tensor
    """(B, d) the batch's A, or on the fly the unpatched pass's."""
    A_hat: torch.Tensor
    """(B, d)"""


Terms = tuple[dict[str, torch.Tensor], dict[str, float], Explained]
"""({term: per-sample value (B,)}, {term: weight}, (A, A_hat)); terms without a weight are logged only."""


def lens_terms(model: LensModel, batch: Batch, knobs: Knobs) -> Terms:
    """Every loss term of one micro-batch, per sample, with its weight (the graph is kept where the weight is not 0)."""
    if model.cfg.loss.grpo_weight > 0:
        return _grpo(model, batch)
    return _straight_through(model, batch, knobs)


def lens_losses(model: LensModel, batch: Batch, knobs: Knobs):
    """(total loss per sample (B,), {term: per-sample value (B,), detached}, (A, A_hat) detached) for one
    micro-batch."""
    values, weights, explained = lens_terms(model, batch, knobs)
    total = sum(w * values[name] for name, w in weights.items() if w != 0)
    return (total, {k: v.detach() for k, v in values.items()},
            Explained(explained.A.detach(), explained.A_hat.detach()))


def unpatched(model: LensModel, batch: Batch) -> tuple[Unpatched, torch.Tensor]:
    """The one unpatched pass over the batch's contexts (target logits and cache of the functional KL) and A: the
    batch's own when dumped, else that pass's block-`layer` output at p (so on the fly nothing else captures it)."""
    run = model.orig.unpatched(batch.input_ids, model.layer, batch.positions)
    return run, run.A if batch.A is None else batch.A


def reconstruct(model: LensModel, A: torch.Tensor, current_ids: torch.Tensor, keys: torch.Tensor, tau: float):
    """A -> explanation (straight-through) -> A_hat."""
    gen = model.decoder.generate(A, model.cfg.decoder.t_text, keys, tau=tau)
    return gen, model.encoder(gen.embeds, current_ids)


def _straight_through(model: LensModel, batch: Batch, knobs: Knobs):
    cfg, lw = model.cfg, model.cfg.loss
    run, A = unpatched(model, batch)
    keys = gumbel_keys(cfg.run.seed, batch.sample_ids)
    gen, A_hat = reconstruct(model, A, batch.current_ids(), keys, knobs.tau)
    A_train = A_hat
    if lw.resample_ablation:
        # A' keeps its own context's information; the lens must carry what A adds on top: A_hat + (A' - A_hat').
        ctx_keys = gumbel_keys(cfg.run.seed, batch.sample_ids, member=1)
        _, A_hat_prime = reconstruct(model, batch.A_prime, batch.prime_ids, ctx_keys, knobs.tau)
        A_train = A_hat + (batch.A_prime - A_hat_prime)

    terms: dict[str, torch.Tensor] = {}
    weighted: dict[str, float] = {}

    with _grad_if(lw.mse_weight > 0):
        terms["mse"] = losses.normalized_mse(A, A_train)
    weighted["mse"] = lw.mse_weight

    with _grad_if(lw.kl_weight > 0):
        terms["kl"] = losses.kl(run.target, model.orig.patched(run, A_train))
    weighted["kl"] = lw.kl_weight

    lm_logits = model.orig.continuation_logits(model.lm_prefix_ids, gen.ids)
    with _grad_if(lw.lm_weight * knobs.alpha > 0):
        terms["lm"] = losses.fluency_kl(lm_logits, gen.logits)
    weighted["lm"] = lw.lm_weight * knobs.alpha

    with _grad_if(lw.entropy_weight * knobs.entropy_mult > 0):
        H = losses.entropy(gen.logits).mean(-1)
        if lw.entropy_cap is not None:
            H = H.clamp(max=lw.entropy_cap)
        terms["entropy"] = H
    weighted["entropy"] = -lw.entropy_weight * knobs.entropy_mult

    return terms, weighted, Explained(A, A_train)


def _grpo(model: LensModel, batch: Batch):
    cfg, lw = model.cfg, model.cfg.loss
    B, G = len(batch.positions), lw.group_size
    run, A_orig = unpatched(model, batch)
    A = A_orig.repeat_interleave(G, dim=0)  # (B*G, d): row b*G + g is member g of group b
    current = batch.current_ids().repeat_interleave(G)
    members = torch.arange(G, device=A.device).repeat(B)
    keys = gumbel_keys(cfg.run.seed, batch.sample_ids.repeat_interleave(G), members)
    # The members share A, so the prompt runs once per group; the sampling pass keeps the logits' graph.
    gen = model.decoder.generate(A, cfg.decoder.t_text, keys, hard=True, temperature=lw.temperature, group=G)

    # Encoder: trained by MSE only (the hard explanation carries no gradient back to the decoder).
    A_hat = model.encoder(gen.embeds, current)
    mse = losses.normalized_mse(A, A_hat)  # (B*G,)
    advantage = losses.group_advantage(-mse.detach().view(B, G)).view(-1)

    # Decoder: trained by the policy term only (its own log-probs of the sampled tokens, from the sampling pass).
    logits = gen.logits
    logp = losses.token_logprobs(logits, gen.ids)
    policy = losses.policy_loss(logp, advantage)
    ref_logp = losses.token_logprobs(
        model.orig.continuation_logits(model.lm_prefix_ids, gen.ids), gen.ids)
    with _grad_if(lw.grpo_beta > 0):
        k3 = losses.k3_kl(logp, ref_logp)

    per_group = lambda x: x.view(B, G).mean(1)  # noqa: E731
    with torch.no_grad():  # logged only: functional KL of the first member of each group, entropy, reward
        first = torch.arange(B, device=A.device) * G
        logged = {"kl": losses.kl(run.target, model.orig.patched(run, A_hat[first])),
                  "entropy": per_group(losses.entropy(logits).mean(-1)), "reward": per_group(-mse)}
    terms = {"mse": per_group(mse), "policy": per_group(policy), "grpo_kl": per_group(k3), **logged}
    weights = {"mse": lw.mse_weight, "policy": lw.grpo_weight, "grpo_kl": lw.grpo_beta}
    return terms, weights, Explained(A_orig, A_hat[first])
