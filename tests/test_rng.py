"""Keyed randomness: deterministic per key, well spread, never exactly 0 or 1, independent of batch layout."""

import pytest
import torch

from lens import rng


def test_unit_interval_is_open_at_both_ends():
    extremes = rng._unit(torch.tensor([0, (1 << 23) - 1]))
    assert 0.0 < extremes[0] and extremes[1] < 1.0
    assert torch.isfinite(-torch.log(-torch.log(extremes))).all()  # Gumbel noise stays finite


def test_keys_are_deterministic_and_depend_on_every_part():
    a = rng.key(0, rng.GUMBEL, torch.arange(5))
    assert torch.equal(a, rng.key(0, rng.GUMBEL, torch.arange(5)))
    assert not torch.equal(a, rng.key(1, rng.GUMBEL, torch.arange(5)))
    assert not torch.equal(a, rng.key(0, rng.POSITION, torch.arange(5)))
    assert len(set(a.tolist())) == 5


def test_a_samples_noise_does_not_depend_on_its_batch():
    ids = torch.arange(100, 110)
    whole = rng.gumbel(rng.key(3, rng.GUMBEL, ids), 50)
    parts = torch.cat([rng.gumbel(rng.key(3, rng.GUMBEL, ids[i:i + 3]), 50) for i in range(0, 10, 3)])
    assert torch.equal(whole, parts)


def test_distributions():
    u = rng.uniform(rng.key(7, torch.arange(200_000)))
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    g = rng.gumbel(rng.key(7, torch.arange(20)), 10_000)
    assert abs(float(g.mean()) - 0.5772) < 0.02 and abs(float(g.std()) - 1.2825) < 0.02
    r = rng.randint(rng.key(1, torch.arange(10_000)), 3, 7)
    assert r.min() == 3 and r.max() == 7 and torch.bincount(r)[3:].min() > 1800


def test_permutation_is_a_permutation_and_changes_with_the_key():
    for n in (1, 2, 3, 5, 1000, 1023, 1024, 1025, 4097):
        p = rng.Permutation(n, 0, 0)(torch.arange(n))
        assert torch.equal(torch.sort(p).values, torch.arange(n)), n
    p0, p1 = rng.Permutation(1000, 0, 0)(torch.arange(1000)), rng.Permutation(1000, 0, 1)(torch.arange(1000))
    assert not torch.equal(p0, p1)
    # index by index equals the batch: an entry does not depend on what else is looked up
    assert [int(rng.Permutation(1000, 0, 0)(torch.tensor([i]))) for i in range(0, 1000, 37)] == p0[::37].tolist()


def test_permutation_looks_shuffled():
    n = 100_000
    p = rng.Permutation(n, 3, 4)(torch.arange(n)).double()
    i = torch.arange(n, dtype=torch.float64)
    assert abs(float(torch.corrcoef(torch.stack([i, p]))[0, 1])) < 0.02
    assert int((p == i).sum()) < 10  # a random permutation has one fixed point on average
    # neighbours land far apart: consecutive samples of an epoch come from all over the corpus
    assert float((p[1:] - p[:-1]).abs().mean()) > 0.3 * n


def test_permutation_of_a_huge_range_needs_only_the_looked_up_indices():
    n = 10**11  # far more than could ever be materialised
    index = torch.tensor([0, 1, 2, n // 2, n - 1])
    p = rng.Permutation(n, 9, 9)(index)
    assert p.min() >= 0 and p.max() < n and len(set(p.tolist())) == len(index)
    with pytest.raises(IndexError):
        rng.Permutation(n, 9, 9)(torch.tensor([n]))
