"""Learning-rate schedules: pure functions of the step, with no state of their own.

A schedule maps the number of optimizer updates done (`state.step`) to a factor of the
optimizer's base `lr`; update `s` uses `lr * schedule(s)`. Each factory matches the
`torch.optim.lr_scheduler` it is named after (the tests compare them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def _check(name: str, value: float, low: float, *, allow_equal: bool = True) -> None:
    ok = value >= low if allow_equal else value > low
    if not ok:
        sign = ">=" if allow_equal else ">"
        raise ValueError(f"{name} must be {sign} {low}, got {value!r}")


def constant() -> Schedule:
    """Factor 1 at every step."""
    return lambda step: 1.0


def linear_warmup(warmup_steps: int, start_factor: float = 0.0) -> Schedule:
    """From `start_factor` up to 1 over `warmup_steps`, then 1 (torch's `LinearLR`)."""
    _check("warmup_steps", warmup_steps, 0)
    _check("start_factor", start_factor, 0.0)

    def schedule(step: int) -> float:
        if warmup_steps == 0 or step >= warmup_steps:
            return 1.0
        return start_factor + (1.0 - start_factor) * step / warmup_steps

    return schedule


def cosine(total_steps: int, final: float = 0.0) -> Schedule:
    """Half a cosine from 1 down to `final` at `total_steps` (torch's `CosineAnnealingLR`)."""
    _check("total_steps", total_steps, 0, allow_equal=False)
    _check("final", final, 0.0)

    def schedule(step: int) -> float:
        t = min(step, total_steps) / total_steps
        return final + (1.0 - final) * (1.0 + math.cos(math.pi * t)) / 2.0

    return schedule


def linear_decay(total_steps: int, final: float = 0.0) -> Schedule:
    """A straight line from 1 down to `final` at `total_steps` (torch's `LinearLR`)."""
    _check("total_steps", total_steps, 0, allow_equal=False)
    _check("final", final, 0.0)

    def schedule(step: int) -> float:
        return 1.0 + (final - 1.0) * min(step, total_steps) / total_steps

    return schedule


def warmup_cosine(
    warmup_steps: int, total_steps: int, final: float = 0.0, start_factor: float = 0.0
) -> Schedule:
    """Linear warmup, then cosine decay to `final` at `total_steps`."""
    _check("warmup_steps", warmup_steps, 0)
    if total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps must be > warmup_steps, got total_steps={total_steps}, "
            f"warmup_steps={warmup_steps}"
        )
    warmup = linear_warmup(warmup_steps, start_factor)
    decay = cosine(total_steps - warmup_steps, final)
    return lambda step: warmup(step) if step < warmup_steps else decay(step - warmup_steps)
