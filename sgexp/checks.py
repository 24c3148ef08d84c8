"""Argument checks shared by every module.

Every public constructor validates its arguments with these helpers so that bad
input fails when an object is built, with a message that names the parameter,
the value it got and what is allowed, never deep inside a forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def fail(name: str, value: object, allowed: str) -> ValueError:
    """The one error format used across sgexp: ``name=value: allowed``."""
    return ValueError(f"{name}={value!r} is invalid: {allowed}")


def check_sparsity(name: str, value: float) -> float:
    """γ must lie in [0, 1): γ=1 would route every token around the span."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, value, "sparsity must be a number in [0, 1)")
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise fail(name, value, "sparsity must be in [0, 1) (fraction of tokens that skip the route)")
    return float(value)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(name, value, "must be an integer >= 1")
    return value


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise fail(name, value, f"must be one of {sorted(choices)}")
    return value


def check_guidance_scale(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(name, value, "guidance scale must be a number >= 1")
    if not math.isfinite(value) or value < 1.0:
        raise fail(name, value, "guidance scale must be >= 1 (w=1 is the unguided strong branch)")
    return float(value)


def check_time_interval(name: str, value: tuple[float, float] | None) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise fail(name, value, "must be a pair (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise fail(name, value, "must be a pair (t_lo, t_hi) with 0 <= t_lo < t_hi <= 1")
    return (lo, hi)
