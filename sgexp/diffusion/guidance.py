"""Guidance rules: which network passes a sampling step runs, and how they combine.

Every rule in the table of DESIGN.md is one pattern, a strong and a weak
prediction extrapolated away from the weak one (CFG, Ho & Salimans 2022;
AutoGuidance, Karras et al. 2024; ICG, Sadat et al. 2024; Sparse Guidance,
Krause et al. 2026, Eq. 7-8):

    D = D_weak + w · (D_strong − D_weak)

A branch is (model, label or null, sparsity schedule). The rules differ only in
their two branches:

    rule     weak branch               strong branch
    none     -                         D(c; γ)          (one pass)
    cfg      D(∅; 0)                   D(c; 0)
    icg      D(c̃; 0), c̃ a random class  D(c; 0)
    sg       D(c; γ_w)                 D(c; γ_s)        both conditional, γ_s < γ_w
    cfg_sg   D(∅; γ_w)                 D(c; γ_s)
    ag       D_weak-model(c; 0)        D(c; 0)
    ag_sg    D_weak-model(c; γ_w)      D(c; γ_s)

``Guidance.passes`` lists the passes of a step without running anything, so the
FLOPs model prices a rule from the same description the sampler executes.

Prefix sharing (beyond the paper): when both passes of a step use the same
model and the same label (SG), they see the same x_t, t and conditioning, so
every block before the first routed block computes the same activations in
both. ``evaluate`` runs that prefix once and branches after it (bit-identical
to two separate passes); ``Guidance.share_prefix`` switches it off, and the
FLOPs model prices whichever is in force. CFG, ICG, CFG+SG and AutoGuidance
branches differ in label or model, so nothing is shared there.

ICG's random label c̃ (independent condition guidance) is drawn per sample
index from its own seed stream (``sgexp.diffusion.seeds.random_labels``), once
per trajectory: sample i guides away from the same c̃ at every step and in every
setting. It is uniform over the classes, so it equals c with probability 1/K.

Schedules that cross (γ_s(t) > γ_w(t) for some t, γ_s < γ_w for others) are
fine with another weak model (AG+SG, the paper's SG_FID), but on one model (SG)
they reverse the guidance direction after the crossing: ``sparse_guidance``
warns (``CrossingScheduleWarning``), naming the schedules and the t.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from sgexp.checks import check_choice, check_guidance_scale, check_sparsity, check_time_interval, fail


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


class CrossingScheduleWarning(UserWarning):
    """SG on one model with γ_strong and γ_weak schedules that cross: the guidance reverses."""


@dataclass(frozen=True)
class Pass:
    """One network evaluation: which model, conditional or null label, at which γ.

    ``random_label``: the label is the sample's random class c̃ (ICG), not its own."""

    model: str
    conditional: bool
    sparsity: float
    random_label: bool = False


@dataclass(frozen=True)
class Branch:
    """One side of a guidance rule: a model, a label choice and a sparsity schedule."""

    model: str = "main"
    conditional: bool = True
    sparsity: Schedule = field(default_factory=Constant)
    random_label: bool = False  # ICG: condition on the sample's random class c̃

    def at(self, step: int, num_steps: int) -> Pass:
        return Pass(self.model, self.conditional, self.sparsity(step, num_steps), self.random_label)

    def __str__(self) -> str:
        label = ("c̃" if self.random_label else "c") if self.conditional else "∅"
        model = "" if self.model == "main" else f"{self.model}:"
        return f"{model}D({label}; γ={self.sparsity})"


@dataclass(frozen=True)
class Guidance:
    """``D_weak + w·(D_strong − D_weak)``, guided only for t in ``interval``.

    Outside the interval, and at w = 1, a step runs the strong branch alone (one
    pass): D_weak + 1·(D_strong − D_weak) = D_strong, without paying for D_weak.
    """

    name: str
    scale: float = 1.0
    strong: Branch = field(default_factory=Branch)
    weak: Branch | None = None
    interval: tuple[float, float] | None = None
    share_prefix: bool = True  # run the blocks before the first routed block once when the passes allow it

    def __post_init__(self) -> None:
        check_guidance_scale("guidance.scale", self.scale)
        if not isinstance(self.share_prefix, bool):
            raise fail("guidance.share_prefix", self.share_prefix, "must be true or false")
        object.__setattr__(self, "interval", check_time_interval("guidance.interval", self.interval))

    @property
    def models(self) -> set[str]:
        """Model names the rule needs (keys of the ``models`` mapping)."""
        return {b.model for b in (self.strong, self.weak) if b is not None}

    @property
    def needs_random_labels(self) -> bool:
        """Whether a branch conditions on a random class (ICG): ``evaluate`` then needs ``random_labels``."""
        return any(b is not None and b.random_label for b in (self.strong, self.weak))

    def guided_at(self, t: float) -> bool:
        if self.weak is None or self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def passes(self, step: int, num_steps: int, t: float) -> list[Pass]:
        """Passes of one evaluation at time t: ``[weak, strong]`` when guided, else ``[strong]``."""
        strong = self.strong.at(step, num_steps)
        if not self.guided_at(t):
            return [strong]
        return [self.weak.at(step, num_steps), strong]

    def shares_prefix(self, passes: list[Pass]) -> bool:
        """Whether ``passes`` (one evaluation) run their common dense prefix once."""
        return self.share_prefix and can_share_prefix(passes)

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Outputs of ``passes`` in the same order -> the guided prediction."""
        if len(outputs) == 1:
            return outputs[0]
        d_weak, d_strong = outputs
        return d_weak + self.scale * (d_strong - d_weak)

    def __str__(self) -> str:
        if self.weak is None:
            return f"{self.name}: {self.strong}"
        interval = f", t∈[{self.interval[0]:g}, {self.interval[1]:g}]" if self.interval else ""
        return f"{self.name}: {self.weak} + {self.scale:g}·({self.strong} − {self.weak}){interval}"

    def to_dict(self) -> dict:
        """Flat description for logs and tracking."""
        return {
            "rule": self.name,
            "scale": self.scale,
            "strong": str(self.strong),
            "weak": str(self.weak) if self.weak else None,
            "interval": list(self.interval) if self.interval else None,
            "share_prefix": self.share_prefix,
        }


def can_share_prefix(passes: list[Pass]) -> bool:
    """Two passes of one model with the same label choice: they agree on everything
    (x_t, t, conditioning) up to the first block that either of them routes."""
    if len(passes) != 2:
        return False
    a, b = passes
    return a.model == b.model and a.conditional == b.conditional and a.random_label == b.random_label


def _pass_labels(p: Pass, model, labels: torch.Tensor, random_labels: torch.Tensor | None) -> torch.Tensor:
    if not p.conditional:
        return torch.full_like(labels, model.null_label)
    if not p.random_label:
        return labels
    if random_labels is None:
        raise fail("random_labels", None, "ICG conditions its weak branch on a random class per sample: pass them")
    return random_labels


def evaluate(
    rule: Guidance,
    models: Mapping[str, torch.nn.Module],
    x: torch.Tensor,
    t: float,
    labels: torch.Tensor,
    step: int,
    num_steps: int,
    generator=None,
    random_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the passes of ``rule`` at (x, t) and combine them. x (B, C, H, W), labels (B,);
    ``random_labels`` (B,): ICG's random class per sample (``seeds.random_labels``).

    With prefix sharing the common prefix runs once (models that offer
    ``forward_prefix``/``forward_suffix``, in eval mode: in training mode label
    dropout would draw once instead of twice). The routing masks are drawn in
    the same order as without sharing, so the result is bit-identical.
    """
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    passes = rule.passes(step, num_steps, t)
    model = models[passes[0].model]
    if rule.shares_prefix(passes) and hasattr(model, "forward_prefix") and not model.training:
        y = _pass_labels(passes[0], model, labels, random_labels)
        num_blocks = model.shared_prefix_blocks([p.sparsity for p in passes])
        prefix = model.forward_prefix(x, t_batch, y, num_blocks)
        outputs = [model.forward_suffix(prefix, sparsity=p.sparsity, generator=generator) for p in passes]
        return rule.combine(outputs)
    outputs = []
    for p in passes:
        model = models[p.model]
        y = _pass_labels(p, model, labels, random_labels)
        outputs.append(model(x, t_batch, y, sparsity=p.sparsity, generator=generator))
    return rule.combine(outputs)


# ----------------------------------------------------------------------------- rules


def unguided(sparsity: float | str | Schedule = 0.0) -> Guidance:
    """D(c; γ): one conditional pass (γ=0: the dense network)."""
    return Guidance("none", strong=Branch(sparsity=as_schedule(sparsity, "sparsity")))


def cfg(scale: float, interval: tuple[float, float] | None = None) -> Guidance:
    """Classifier-free guidance: D(∅;0) + w·(D(c;0) − D(∅;0))."""
    return Guidance("cfg", scale, strong=Branch(), weak=Branch(conditional=False), interval=interval)


def icg(scale: float, interval: tuple[float, float] | None = None) -> Guidance:
    """Independent condition guidance (Sadat et al. 2024): D(c̃;0) + w·(D(c;0) − D(c̃;0)),
    c̃ a uniformly random class per sample, fixed over its trajectory (module docstring).
    Two dense passes per step like CFG; they differ in label, so no prefix is shared."""
    weak = Branch(random_label=True)
    return Guidance("icg", scale, strong=Branch(), weak=weak, interval=interval)


def _sparse_branches(strong_sparsity, weak_sparsity) -> tuple[Schedule, Schedule]:
    return as_schedule(strong_sparsity, "gamma_strong"), as_schedule(weak_sparsity, "gamma_weak")


def sparse_guidance(
    scale: float,
    strong_sparsity: float | str | Schedule = 0.5,
    weak_sparsity: float | str | Schedule = 0.9,
    interval: tuple[float, float] | None = None,
    share_prefix: bool = True,
) -> Guidance:
    """Sparse Guidance (Eq. 7): D(c;γ_w) + w·(D(c;γ_s) − D(c;γ_w)), both conditional.

    With constant schedules the weak branch must be sparser: γ_s < γ_w. Both
    branches see the same x_t and label, so by default the blocks before the
    first routed block run once (``share_prefix``; bit-identical either way).
    """
    strong, weak = _sparse_branches(strong_sparsity, weak_sparsity)
    if isinstance(strong, Constant) and isinstance(weak, Constant) and strong.value >= weak.value:
        raise fail(
            "gamma_strong", strong.value, f"Sparse Guidance needs gamma_strong < gamma_weak (gamma_weak={weak.value})"
        )
    rule = Guidance(
        "sg", scale, Branch(sparsity=strong), Branch(sparsity=weak), interval=interval, share_prefix=share_prefix
    )
    crossing = schedule_crossing(strong, weak)
    if crossing is not None:
        warnings.warn(
            f"{rule}: gamma_strong={strong} and gamma_weak={weak} cross at t≈{1 - crossing:.2f} "
            f"({crossing:.0%} of the sampling steps): on one model the guidance direction reverses there. "
            "The paper's crossing schedules (SG_FID) guide with another checkpoint: rule ag_sg",
            CrossingScheduleWarning,
            stacklevel=2,
        )
    return rule


def cfg_sparse_guidance(
    scale: float,
    strong_sparsity: float | str | Schedule = 0.0,
    weak_sparsity: float | str | Schedule = 0.5,
    interval: tuple[float, float] | None = None,
) -> Guidance:
    """CFG + SG (Eq. 8): D(∅;γ_w) + w·(D(c;γ_s) − D(∅;γ_w))."""
    strong, weak = _sparse_branches(strong_sparsity, weak_sparsity)
    weak_branch = Branch(conditional=False, sparsity=weak)
    return Guidance("cfg_sg", scale, strong=Branch(sparsity=strong), weak=weak_branch, interval=interval)


def autoguidance(
    scale: float,
    strong_sparsity: float | str | Schedule = 0.0,
    weak_sparsity: float | str | Schedule = 0.0,
    interval: tuple[float, float] | None = None,
) -> Guidance:
    """AutoGuidance, weak branch = model ``"weak"`` (an earlier or smaller checkpoint);
    with non-zero sparsities it is AG+SG (the paper's SG_FID setting uses cosine
    0.6→0 on the weak branch and 0→0.6 on the strong one)."""
    strong, weak = _sparse_branches(strong_sparsity, weak_sparsity)
    name = "ag" if strong == Constant(0.0) and weak == Constant(0.0) else "ag_sg"
    weak_branch = Branch(model="weak", sparsity=weak)
    return Guidance(name, scale, strong=Branch(sparsity=strong), weak=weak_branch, interval=interval)


RULES = ("none", "cfg", "icg", "sg", "cfg_sg", "ag", "ag_sg")


def build_guidance(
    rule: str,
    scale: float = 1.0,
    gamma_strong: float | str | Schedule = 0.0,
    gamma_weak: float | str | Schedule = 0.0,
    interval: tuple[float, float] | None = None,
    share_prefix: bool = True,
) -> Guidance:
    """A rule by name, for configs and command lines (``none`` uses ``gamma_strong``).

    ``share_prefix=False`` runs every pass in full even where the passes could
    share their dense prefix (see the module docstring)."""
    check_choice("guidance", rule, RULES)
    return replace(_build(rule, scale, gamma_strong, gamma_weak, interval), share_prefix=share_prefix)


def _build(rule, scale, gamma_strong, gamma_weak, interval) -> Guidance:
    if rule == "none":
        return unguided(gamma_strong)
    if rule in ("cfg", "icg"):
        if as_schedule(gamma_strong) != Constant(0.0) or as_schedule(gamma_weak) != Constant(0.0):
            raise fail("guidance", rule, f"plain {rule.upper()} runs dense passes; use 'cfg_sg' for sparse branches")
        return (cfg if rule == "cfg" else icg)(scale, interval)
    builder = {
        "sg": sparse_guidance,
        "cfg_sg": cfg_sparse_guidance,
        "ag": autoguidance,
        "ag_sg": autoguidance,
    }[rule]
    return builder(scale, gamma_strong, gamma_weak, interval)
