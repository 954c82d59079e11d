"""Counter-based randomness keyed by (seed, stream, sample index, ...).

Every random choice that affects one sample (its position, its Gumbel noise, its sampled explanation) is a pure
function of integer keys, computed on whatever device the tensors live on. So a sample gets the same randomness
whichever rank processes it, in whichever batch, after however many restarts: results do not depend on the world
size. The mixer is splitmix64's finaliser, done in int64 with masked (logical) right shifts.
"""

from __future__ import annotations

import torch

# Streams keep independent uses of the same sample index apart.
POSITION = 1
GUMBEL = 2
VAL_POSITION = 3
PERMUTATION = 4
RESAMPLE = 5

_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
_M2 = -7723592293110705685  # 0x94D049BB133111EB as int64
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: a bijective, well-mixed int64 -> int64 map."""
    x = x * 1  # copy; int64 arithmetic wraps around
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def key(*parts: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Combine integer parts (ints or int64 tensors, broadcast together) into one int64 key tensor, on `device` or
    else on the device of the tensor parts."""
    if device is None:
        device = next((p.device for p in parts if isinstance(p, torch.Tensor)), "cpu")
    k = torch.zeros((), dtype=torch.int64, device=device)
    for part in parts:
        k = mix(k + _GOLDEN + torch.as_tensor(part, dtype=torch.int64, device=device))
    return k


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """A float32 strictly inside (0, 1) per key, from the top 23 bits of mix(key). (With 24 bits the largest value
    rounds to 1.0 in float32 and its Gumbel noise becomes inf.)"""
    return _unit(_shr(mix(keys), 41))


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """23-bit integers -> float32 in (0, 1), both ends excluded."""
    return (bits.to(torch.float32) + 0.5) / float(1 << 23)


def gumbel(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (*keys.shape, n): one independent draw per key and per index in [0, n)."""
    idx = torch.arange(n, dtype=torch.int64, device=keys.device)
    u = uniform(mix(keys.unsqueeze(-1) + _GOLDEN) ^ idx)
    return -torch.log(-torch.log(u))


def randint(keys: torch.Tensor, low: torch.Tensor | int, high: torch.Tensor | int) -> torch.Tensor:
    """An integer in [low, high] (inclusive) per key."""
    low = torch.as_tensor(low, device=keys.device)
    span = torch.as_tensor(high, device=keys.device) - low + 1
    return low + (uniform(keys) * span).floor().to(torch.int64).clamp(max=span - 1)


class Permutation:
    """A keyed permutation of range(n), evaluated per index: `perm(i)` maps an int64 tensor of indices to their
    images. Nothing of size n is built (a 10-billion-token corpus has ~10^8 sequences: an argsort would hold GBs on
    every rank), so memory follows the batch, not the corpus. A balanced Feistel network over the smallest domain of
    2^(2h) >= n values, with cycle walking (re-apply until the value is below n, a bijection of range(n) since it
    follows the domain permutation's cycles); the round function is `mix` keyed per round."""

    ROUNDS = 6

    def __init__(self, n: int, *parts: int):
        if n < 1:
            raise ValueError(f"a permutation of range({n}) is empty")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = (1 << self.half) - 1
        self.round_keys = [int(key(*parts, r)) for r in range(self.ROUNDS)]

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x >> self.half, x & self.mask  # x < 2^(2h) <= 2^62: non-negative, so >> is logical
        for k in self.round_keys:
            left, right = right, left ^ (mix(right + k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.int64)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise IndexError(f"permutation index out of range [0, {self.n})")
        x = self._feistel(index)
        outside = x >= self.n
        while outside.any():  # fewer than 4 rounds expected: the domain is below 4 n
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x
