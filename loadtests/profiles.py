"""User counts over time for the load shapes, as plain functions of the run time.

Kept apart from shapes.py so they can be checked without importing locust (which
monkey-patches the interpreter with gevent on import). None means "the run is over".
"""

from __future__ import annotations

import math


def ramp_users(t: float, peak: int, ramp_s: float, hold_s: float) -> int | None:
    """Linear from 0 to `peak` over `ramp_s`, then `hold_s` at the peak."""
    if t >= ramp_s + hold_s:
        return None
    return peak if t >= ramp_s else max(1, math.ceil(peak * t / max(ramp_s, 1e-9)))


def step_users(t: float, peak: int, step: int, step_s: float) -> int | None:
    """+`step` users every `step_s` up to `peak`, then one more step at the peak."""
    steps = math.ceil(peak / max(step, 1))
    if t >= (steps + 1) * step_s:
        return None
    return min(peak, (int(t // step_s) + 1) * step)


def soak_users(t: float, peak: int, ramp_s: float, soak_s: float) -> int | None:
    """Ramp to `peak` over `ramp_s`, then hold it for `soak_s`."""
    return ramp_users(t, peak, ramp_s, soak_s)
