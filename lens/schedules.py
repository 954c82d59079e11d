"""Step -> value schedules: tau, alpha, entropy multipliers and the learning rate. Pure functions of the step."""

from __future__ import annotations

import math

from lens.config import OptimConfig, ScheduleConfig, parse_duration


def schedule_value(s: ScheduleConfig, step: int, steps_per_epoch: int) -> float:
    """`start` for `hold`, then linear or cosine to `end` over `ramp`, then `end`."""
    if s.end is None:
        return s.start
    hold = parse_duration(s.hold, steps_per_epoch)
    ramp = parse_duration(s.ramp, steps_per_epoch)
    if step < hold:
        return s.start
    frac = 1.0 if ramp == 0 else min(1.0, (step - hold) / ramp)
    if s.kind == "cosine":
        frac = 0.5 * (1 - math.cos(math.pi * frac))
    return s.start + (s.end - s.start) * frac


def lr_at(o: OptimConfig, step: int, max_steps: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr`, then constant, or cosine that
    reaches exactly `min_lr` at the last step."""
    warmup = parse_duration(o.warmup, steps_per_epoch)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    if o.decay == "constant":
        return o.lr
    span = max_steps - 1 - warmup
    frac = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * frac))
