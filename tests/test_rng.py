"""Keyed randomness: deterministic per key, well spread, never exactly 0 or 1, independent of batch layout."""

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
    p0, p1 = rng.permutation(1000, 0, 0), rng.permutation(1000, 0, 1)
    assert torch.equal(torch.sort(p0).values, torch.arange(1000)) and not torch.equal(p0, p1)
