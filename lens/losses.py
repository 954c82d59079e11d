"""One pure function per loss term. All return one value per sample (B,), so that any split of a global batch
over processes and micro-batches sums to the same gradient. Weighting happens in `lens.objective`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(A: torch.Tensor, A_hat: torch.Tensor) -> torch.Tensor:
    """||A - A_hat||^2 / ||A||^2 per sample: (B, d), (B, d) -> (B,)."""
    A, A_hat = A.float(), A_hat.float()
    return (A - A_hat).pow(2).sum(-1) / A.pow(2).sum(-1).clamp_min(1e-12)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) over the last dim, in fp32: (..., V), (..., V) -> (...)."""
    logp = F.log_softmax(p_logits.float(), dim=-1)
    logq = F.log_softmax(q_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def fluency_kl(lm_logits: torch.Tensor, decoder_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_LM || P_decoder) averaged over the T explanation positions: (B, T, V) x2 -> (B,)."""
    return kl(lm_logits, decoder_logits).mean(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[b, t]) under logits[b, t]: (B, T, V), (B, T) -> (B, T)."""
    return F.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def group_advantage(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage: (r - group mean) / group std, per group: (B, G) -> (B, G)."""
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def policy_loss(logprobs: torch.Tensor, advantage: torch.Tensor) -> torch.Tensor:
    """-mean_t(logp_t * adv): (N, T), (N,) -> (N,)."""
    return -(logprobs * advantage.unsqueeze(-1)).mean(-1)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || ref) from sampled tokens, averaged over T: (N, T) x2 -> (N,)."""
    log_ratio = ref_logprobs - logprobs
    return (log_ratio.exp() - log_ratio - 1).mean(-1)
