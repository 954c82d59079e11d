"""Held-out metrics and baselines on a tiny real lens."""

import pytest
import torch

from lens.evaluate import (affine_fit, cosine, evaluate, explain_samples, explained_rows, fve_nrm,
                           lens_predictions, variance_recovered)
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


def test_fve_nrm_and_cosine_definitions():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(300, 8, generator=g, dtype=torch.float64) + 2.0  # a shared mean, as residual streams have
    a = A / A.norm(dim=-1, keepdim=True)
    assert fve_nrm(A, A) == pytest.approx(1.0) and cosine(A, A) == pytest.approx(1.0)
    # only directions count: any positive rescaling of a row changes nothing
    assert fve_nrm(A, A * (torch.rand(300, 1, generator=g, dtype=torch.float64) * 5 + 1e-3)) == pytest.approx(1.0)
    noisy = A + torch.randn(300, 8, generator=g, dtype=torch.float64)
    b = noisy / noisy.norm(dim=-1, keepdim=True)
    by_hand = 1 - (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
    assert fve_nrm(A, noisy) == pytest.approx(float(by_hand), rel=1e-9)
    assert cosine(A, noisy) == pytest.approx(float(torch.nn.functional.cosine_similarity(A, noisy).mean()))
    assert cosine(A, -A) == pytest.approx(-1.0)
    # the zero prediction has no direction: cosine 0, fve_nrm = 1 - N / sum ||a - mean(a)||^2 (< 0)
    assert cosine(A, torch.zeros_like(A)) == 0.0
    assert fve_nrm(A, torch.zeros_like(A)) == pytest.approx(float(1 - 300 / (a - a.mean(0)).pow(2).sum()))
    # not symmetric in its arguments: the spread of A's directions is the denominator
    assert fve_nrm(A, noisy) != pytest.approx(fve_nrm(noisy, A), rel=1e-3)


def test_explained_rows_are_fixed_and_spread():
    assert explained_rows(12, 4) == [0, 4, 7, 11]
    assert explained_rows(3, 8) == [0, 1, 2]
    assert explained_rows(10, 1) == [0] and explained_rows(10, 0) == []


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
        for name in ("variance_recovered", "fve_nrm", "cosine", "nmse", "kl"):
            assert torch.isfinite(torch.tensor(metrics[prefix + name]))
    assert metrics["baseline_zero/nmse"] == pytest.approx(1.0)
    assert metrics["baseline_zero/variance_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["baseline_zero/cosine"] == 0.0
    A_hat = lens_predictions(lens, batch, 3)[0]
    assert metrics["fve_nrm"] == pytest.approx(fve_nrm(batch.A, A_hat), abs=1e-6)
    assert metrics["cosine"] == pytest.approx(cosine(batch.A, A_hat), abs=1e-6)
    # a perfect reconstruction has zero KL; the zero ablation does not
    assert metrics["baseline_zero/kl"] > 0
    # the same numbers whatever the micro-batch size (each sample keeps its own noise)
    again = evaluate(lens, batch, batch, micro_batch_size=4)
    assert again["variance_recovered"] == pytest.approx(metrics["variance_recovered"], abs=1e-5)


@pytest.mark.parametrize("family", ["llama"])
def test_sample_explanations_are_the_held_out_sets_own(lm, tokenizer, contexts):
    lens = LensModel(lens_cfg(), lm, tokenizer)
    batch = make_batch(lens, contexts)  # positions 5, 9, 17, 23
    samples = explain_samples(lens, batch, [1, 3], micro_batch_size=3, before=2, after=1)
    _, ids, _ = lens_predictions(lens, batch, 3)
    assert [s.sample for s in samples] == [1, 3]
    decode = lambda t: tokenizer.decode(t.tolist())  # noqa: E731
    row = contexts[1]
    assert samples[0].context == f"{decode(row[7:9])}[[{decode(row[9:10])}]]{decode(row[10:11])}"
    assert samples[1].context.endswith(f"[[{decode(contexts[3][23:24])}]]")  # the last token: nothing after it
    assert samples[1].explanation == decode(ids[3])
    from lens import losses

    nmse = losses.normalized_mse(batch.A, lens_predictions(lens, batch, 3)[0])
    assert [s.nmse for s in samples] == pytest.approx([float(nmse[1]), float(nmse[3])], abs=1e-6)
