"""Held-out metrics of a lens and the baselines it must beat (ALGORITHM.md §5)."""

from __future__ import annotations

import torch

from lens import losses
from lens.models.lens_model import LensModel
from lens.objective import Batch, gumbel_keys, reconstruct


def variance_recovered(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """1 - sum_d Var(A_d - A_hat_d) / sum_d Var(A_d) over the rows of (N, d) tensors."""
    A, A_hat = A.double(), A_hat.double()
    return float(1 - (A - A_hat).var(0).sum() / A.var(0).sum())


def _chunks(batch: Batch, size: int):
    for i in range(0, len(batch.positions), size):
        s = slice(i, i + size)
        yield Batch(batch.input_ids[s], batch.positions[s], batch.A[s], batch.sample_ids[s])


@torch.no_grad()
def lens_predictions(model: LensModel, batch: Batch, micro_batch_size: int,
                     member: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A_hat (N, d), explanation ids (N, T), explanation embeddings (N, T, d)) with each sample's own Gumbel keys
    (`member` m > 0: the m-th other draw): member 0 is the forward value of the training objective, so held-out
    numbers are comparable with training ones."""
    outs = []
    for b in _chunks(batch, micro_batch_size):
        keys = gumbel_keys(model.cfg.run.seed, b.sample_ids, member)
        gen, A_hat = reconstruct(model, b.A, b.current_ids(), keys, tau=1.0)
        outs.append((A_hat, gen.ids, gen.embeds))
    return tuple(torch.cat(parts) for parts in zip(*outs))


@torch.no_grad()
def target_logits(model: LensModel, batch: Batch, size: int) -> list[torch.Tensor]:
    return [model.orig.patched_logits(b.input_ids, model.layer, b.positions, None) for b in _chunks(batch, size)]


@torch.no_grad()
def functional_kl(model: LensModel, batch: Batch, targets: list[torch.Tensor], A_hat: torch.Tensor,
                   size: int) -> torch.Tensor:
    kls = []
    for i, (b, target) in enumerate(zip(_chunks(batch, size), targets)):
        patched = model.orig.patched_logits(b.input_ids, model.layer, b.positions, A_hat[i * size:(i + 1) * size])
        kls.append(losses.kl(target, patched))
    return torch.cat(kls)


@torch.no_grad()
def token_only_features(model: LensModel, batch: Batch, size: int) -> torch.Tensor:
    """The encoder fed only the current token (no explanation): its block-L' output, (N, d)."""
    feats = []
    for b in _chunks(batch, size):
        empty = b.A.new_zeros(len(b.positions), 0, b.A.shape[-1])
        feats.append(model.encoder.features(empty, b.current_ids()))
    return torch.cat(feats)


def _ridge(X: torch.Tensor, Y: torch.Tensor, strength: float) -> torch.Tensor:
    """[X, 1] W ~ Y by ridge least squares in float64: (N, d_in), (N, d_out) -> (d_in + 1, d_out)."""
    X = torch.cat([X.double(), X.new_ones(len(X), 1, dtype=torch.float64)], 1)
    gram = X.T @ X
    gram += strength * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram, X.T @ Y.double())


def _apply(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    X = X.double()
    return (torch.cat([X, X.new_ones(len(X), 1)], 1) @ W).float()


def affine_fit(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Ridge fit whose strength is chosen on the last quarter of the rows (few rows, many features: an unregularised
    fit would memorise them and make the baseline look worse than it is), then refit on all rows."""
    n_fit = max(1, (3 * len(X)) // 4)
    best = min((10.0 ** k for k in range(-4, 3)), key=lambda s: float(
        (_apply(X[n_fit:], _ridge(X[:n_fit], Y[:n_fit], s)) - Y[n_fit:].float()).pow(2).sum()))
    return _ridge(X, Y, best)


@torch.no_grad()
def evaluate(model: LensModel, held_out: Batch, fit: Batch, micro_batch_size: int) -> dict[str, float]:
    """Metrics of the lens on `held_out`, next to the baselines. `fit` (training activations) supplies the mean
    for mean ablation and the fit of the current-token baseline's read-out (ridge least squares on the encoder's
    token-only features, so the baseline gets the best affine read-out of what the token alone tells)."""
    A = held_out.A.float()
    A_hat, _, _ = lens_predictions(model, held_out, micro_batch_size)
    W = affine_fit(token_only_features(model, fit, micro_batch_size), fit.A)
    candidates = {
        "lens": A_hat,
        "zero": torch.zeros_like(A),
        "mean": fit.A.float().mean(0, keepdim=True).expand_as(A),
        "token": _apply(token_only_features(model, held_out, micro_batch_size), W),
    }
    targets = target_logits(model, held_out, micro_batch_size)
    metrics = {}
    for name, pred in candidates.items():
        prefix = "" if name == "lens" else f"baseline_{name}/"
        metrics[f"{prefix}variance_recovered"] = variance_recovered(A, pred)
        metrics[f"{prefix}nmse"] = float(losses.normalized_mse(A, pred).mean())
        metrics[f"{prefix}kl"] = float(functional_kl(model, held_out, targets, pred, micro_batch_size).mean())
    return metrics
