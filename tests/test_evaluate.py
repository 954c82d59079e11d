"""Held-out metrics and baselines on a tiny real lens."""

import pytest
import torch

from lens.evaluate import affine_fit, evaluate, variance_recovered
from lens.models.lens_model import LensModel
from test_models import lens_cfg, make_batch


def test_variance_recovered_definition():
    A = torch.randn(500, 8) * torch.arange(1, 9)
    assert variance_recovered(A, A) == pytest.approx(1.0)
    assert variance_recovered(A, torch.zeros_like(A)) == pytest.approx(0.0, abs=1e-9)
    assert variance_recovered(A, A.mean(0, keepdim=True).expand_as(A)) == pytest.approx(0.0, abs=1e-9)
    # dims count by their variance: recovering only the largest dim recovers its share
    only_last = torch.zeros_like(A)
    only_last[:, -1] = A[:, -1]
    share = float(A[:, -1].var() / A.var(0).sum())
    assert variance_recovered(A, only_last) == pytest.approx(share, rel=1e-6)


def test_affine_fit_recovers_a_linear_map_and_regularises_small_samples():
    X = torch.randn(400, 6, dtype=torch.float64)
    W = torch.randn(6, 3, dtype=torch.float64)
    Y = X @ W + 0.5
    fitted = affine_fit(X, Y)
    assert torch.allclose(torch.cat([X, torch.ones(400, 1, dtype=torch.float64)], 1) @ fitted, Y, atol=1e-2)


@pytest.mark.parametrize("family", ["llama"])
def test_evaluate_reports_lens_and_baselines(lm, tokenizer, contexts):
    lens = LensModel(lens_cfg(), lm, tokenizer)
    batch = make_batch(lens, contexts)
    metrics = evaluate(lens, batch, batch, micro_batch_size=3)
    for prefix in ("", "baseline_zero/", "baseline_mean/", "baseline_token/"):
        for name in ("variance_recovered", "nmse", "kl"):
            assert torch.isfinite(torch.tensor(metrics[prefix + name]))
    assert metrics["baseline_zero/nmse"] == pytest.approx(1.0)
    assert metrics["baseline_zero/variance_recovered"] == pytest.approx(0.0, abs=1e-6)
    # a perfect reconstruction has zero KL; the zero ablation does not
    assert metrics["baseline_zero/kl"] > 0
    # the same numbers whatever the micro-batch size (each sample keeps its own noise)
    again = evaluate(lens, batch, batch, micro_batch_size=4)
    assert again["variance_recovered"] == pytest.approx(metrics["variance_recovered"], abs=1e-5)
