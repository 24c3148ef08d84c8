"""Sparsity schedules γ(step): how many tokens a guidance branch routes at each sampling step.

A branch's γ is a constant (the paper's SG(0.5, 0.9)) or a half-cosine between two values
(the paper's SG_FID: cosine 0.6 → 0 on the weak branch and 0 → 0.6 on the strong one).
``as_schedule`` reads both from configs and command lines: a number or ``"cosine:START:END"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sgexp.checks import check_sparsity, fail


@dataclass(frozen=True)
class Constant:
    """The same γ at every sampling step."""

    value: float = 0.0

    def __post_init__(self) -> None:
        check_sparsity("sparsity", self.value)

    def __call__(self, step: int, num_steps: int) -> float:
        return self.value

    def __str__(self) -> str:
        return f"{self.value:g}"


@dataclass(frozen=True)
class Cosine:
    """γ moves from ``start`` (first step) to ``end`` (last step) along a half cosine."""

    start: float
    end: float

    def __post_init__(self) -> None:
        check_sparsity("sparsity.start", self.start)
        check_sparsity("sparsity.end", self.end)

    def __call__(self, step: int, num_steps: int) -> float:
        if num_steps <= 1:
            return self.start
        progress = step / (num_steps - 1)
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))

    def __str__(self) -> str:
        return f"cosine:{self.start:g}:{self.end:g}"


Schedule = Constant | Cosine


def as_schedule(value: float | str | Schedule, name: str = "sparsity") -> Schedule:
    """A number (constant γ), ``"cosine:START:END"``, or a schedule object."""
    if isinstance(value, (Constant, Cosine)):
        return value
    if isinstance(value, str) and value.startswith("cosine:"):
        try:
            start, end = (float(v) for v in value.split(":")[1:])
        except ValueError:
            raise fail(name, value, "expected 'cosine:START:END', e.g. 'cosine:0.6:0'") from None
        return Cosine(start, end)
    try:
        return Constant(check_sparsity(name, float(value)))
    except (TypeError, ValueError) as err:
        if "is invalid" in str(err):
            raise
        raise fail(name, value, "expected a number in [0, 1) or 'cosine:START:END'") from None


def schedule_crossing(strong: Schedule, weak: Schedule) -> float | None:
    """Sampling progress p ∈ (0, 1) (t ≈ 1 − p) where γ_strong − γ_weak changes sign, or None.

    Both schedules are ``end + (start − end)·c(p)`` with the same c(p) = (1 + cos πp)/2
    (a constant has start = end), so the difference is linear in c and crosses at most once.
    """
    first, last = (strong(i, 2) - weak(i, 2) for i in (0, 1))  # at p = 0 (c = 1) and p = 1 (c = 0)
    if first * last >= 0:
        return None
    c = last / (last - first)
    return math.acos(2 * c - 1) / math.pi
