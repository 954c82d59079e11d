"""Held-out metrics of a lens and the baselines it must beat (ALGORITHM.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lens import losses
from lens.models.lens_model import LensModel
from lens.objective import Batch, gumbel_keys, reconstruct


def variance_recovered(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """1 - sum_d Var(A_d - A_hat_d) / sum_d Var(A_d) over the rows of (N, d) tensors."""
    A, A_hat = A.double(), A_hat.double()
    return float(1 - (A - A_hat).var(0).sum() / A.var(0).sum())


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm in float64; a zero row stays zero (the zero ablation has no direction)."""
    return F.normalize(x.double(), dim=-1)


def fve_nrm(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """Fraction of variance explained on unit-normalised vectors (how natural-language-autoencoder results are
    reported): with a = A/||A||, a_hat = A_hat/||A_hat|| per row, 1 - sum ||a - a_hat||^2 / sum ||a - mean(a)||^2,
    the mean over the rows of `A`. Only directions count, so it compares across layers and models whose activation
    norms differ. Predictions are normalised too, so a constant one (the mean ablation) scores below 0 unless the
    directions of `A` are tightly clustered, and the zero prediction scores 1 - N / sum ||a - mean(a)||^2."""
    a, a_hat = unit(A), unit(A_hat)
    return float(1 - (a - a_hat).pow(2).sum() / (a - a.mean(0, keepdim=True)).pow(2).sum())


def cosine(A: torch.Tensor, A_hat: torch.Tensor) -> float:
    """Mean over rows of cos(A, A_hat) (0 for a zero row)."""
    return float((unit(A) * unit(A_hat)).sum(-1).mean())


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
def functional_kls(model: LensModel, batch: Batch, predictions: dict[str, torch.Tensor],
                   size: int) -> dict[str, torch.Tensor]:
    """Per-sample functional KL (N,) of each prediction (N, d): per chunk one unpatched pass (its logits are the
    target, its cache serves every patched pass), then one single-token patched pass per prediction."""
    kls: dict[str, list[torch.Tensor]] = {name: [] for name in predictions}
    for i, b in enumerate(_chunks(batch, size)):
        run = model.orig.unpatched(b.input_ids, model.layer, b.positions)
        for name, pred in predictions.items():
            kls[name].append(losses.kl(run.target, model.orig.patched(run, pred[i * size:(i + 1) * size])))
    return {name: torch.cat(parts) for name, parts in kls.items()}


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
    kls = functional_kls(model, held_out, candidates, micro_batch_size)
    metrics = {}
    for name, pred in candidates.items():
        prefix = "" if name == "lens" else f"baseline_{name}/"
        metrics[f"{prefix}variance_recovered"] = variance_recovered(A, pred)
        metrics[f"{prefix}fve_nrm"] = fve_nrm(A, pred)
        metrics[f"{prefix}cosine"] = cosine(A, pred)
        metrics[f"{prefix}nmse"] = float(losses.normalized_mse(A, pred).mean())
        metrics[f"{prefix}kl"] = float(kls[name].mean())
    return metrics


@dataclass
class SampleExplanation:
    """The lens on one held-out position, for a reader watching training."""

    sample: int
    """Row of the held-out set."""
    context: str
    """The tokens around position p, the token at p in [[ ]] (the activation sees only it and what precedes it)."""
    explanation: str
    nmse: float


def explained_rows(n_held_out: int, k: int) -> list[int]:
    """`k` rows evenly spread over the held-out set: a pure function of the config, so the same positions are shown
    at every evaluation and after a resume."""
    k = min(k, n_held_out)
    return [round(i * (n_held_out - 1) / max(k - 1, 1)) for i in range(k)]


def _show(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids.tolist())


@torch.no_grad()
def explain_samples(model: LensModel, held_out: Batch, rows: list[int], micro_batch_size: int,
                    before: int = 10, after: int = 3) -> list[SampleExplanation]:
    """Explanations of `rows` of `held_out`, each with `before`/`after` tokens of context around its position. The
    same forward (and Gumbel keys) as `evaluate`, so these are the held-out set's own explanations."""
    idx = torch.tensor(rows, dtype=torch.long, device=held_out.positions.device)
    batch = Batch(held_out.input_ids[idx], held_out.positions[idx], held_out.A[idx], held_out.sample_ids[idx])
    A_hat, ids, _ = lens_predictions(model, batch, micro_batch_size)
    nmse = losses.normalized_mse(batch.A, A_hat)
    tok = model.tokenizer
    out = []
    for i, row in enumerate(rows):
        ctx, p = batch.input_ids[i], int(batch.positions[i])
        context = (f"{_show(tok, ctx[max(0, p - before):p])}[[{_show(tok, ctx[p:p + 1])}]]"
                   f"{_show(tok, ctx[p + 1:p + 1 + after])}")
        out.append(SampleExplanation(row, context, _show(tok, ids[i]), float(nmse[i])))
    return out
