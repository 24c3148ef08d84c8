"""Guidance rules as data: which network passes a sampling step runs, and how they combine.

A rule is a list of branches and the weights of an affine combination (CFG, Ho & Salimans
2022; AutoGuidance, Karras et al. 2024; ICG, Sadat et al. 2024; Sparse Guidance, Krause et
al. 2026, Eq. 7-8):

    D = Σ_i a_i · D_i,   Σ_i a_i = 1,   computed as   D_0 + Σ_{i≥1} a_i · (D_i − D_0)

Every rule of the paper has two branches, weak then strong, with a = (1 − w, w):

    D = D_weak + w · (D_strong − D_weak)

A branch is (model, label or null, sparsity schedule); the named rules (``RULES``) differ
only in their weak branch and in which γ they read:

    rule     weak branch               strong branch
    none     -                         D(c; γ)          (one pass)
    cfg      D(∅; 0)                   D(c; 0)
    icg      D(c̃; 0), c̃ a random class  D(c; 0)
    sg       D(c; γ_w)                 D(c; γ_s)        both conditional, γ_s < γ_w
    cfg_sg   D(∅; γ_w)                 D(c; γ_s)
    ag       D_weak-model(c; 0)        D(c; 0)
    ag_sg    D_weak-model(c; γ_w)      D(c; γ_s)

A new two-branch rule is one ``RULES`` entry; a rule with more branches (say CFG on top of
SG) is one ``Guidance(name, branches, weights)``. ``Guidance.passes`` lists the passes of a
step without running anything, so ``sgexp.flops`` prices a rule from the same description
the sampler executes.

Prefix sharing (beyond the paper): when all passes of a step use the same model and the
same label (SG), they see the same x_t, t and conditioning, so every block before the first
routed block computes the same activations in each. ``evaluate`` runs that prefix once and
branches after it (bit-identical to separate passes); ``Guidance.share_prefix`` switches it
off, and the FLOPs model prices whichever is in force. CFG, ICG, CFG+SG and AutoGuidance
branches differ in label or model, so nothing is shared there.

With a compiled network (``DiT.compile_core``, ``trainer.compile``), a step's random draws run
eagerly in the same order and all its passes run as one compiled call
(``sgexp.diffusion.guided_step``): CFG's branches as one batch, SG's prefix once.

ICG's random label c̃ (independent condition guidance) is drawn per sample index from its
own seed stream (``sgexp.diffusion.seeds.random_labels``), once per trajectory: sample i
guides away from the same c̃ at every step and in every setting. It is uniform over the
classes, so it equals c with probability 1/K.

Schedules that cross (γ_s(t) > γ_w(t) for some t, γ_s < γ_w for others) are fine with
another weak model (AG+SG, the paper's SG_FID), but on one model (SG) they reverse the
guidance direction after the crossing: such rules warn (``CrossingScheduleWarning``),
naming the schedules and the t.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from sgexp.checks import check_choice, check_guidance_scale, check_time_interval, fail
from sgexp.diffusion.guided_step import combine, guided_passes
from sgexp.diffusion.schedules import Constant, Schedule, as_schedule, schedule_crossing


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
    """One prediction a rule combines: a model, a label choice and a sparsity schedule."""

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
    """``Σ_i weights[i]·D(branches[i])``, guided only for t in ``interval``.

    The last branch is the strong (base) prediction: outside the interval, and when all
    weight is on it (w = 1), a step runs it alone, without paying for the others.
    """

    name: str
    branches: tuple[Branch, ...]
    weights: tuple[float, ...]
    interval: tuple[float, float] | None = None
    share_prefix: bool = True  # run the blocks before the first routed block once when the passes allow it

    def __post_init__(self) -> None:
        object.__setattr__(self, "branches", tuple(self.branches))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not self.branches or len(self.weights) != len(self.branches):
            raise fail("guidance.weights", self.weights, f"one weight per branch ({len(self.branches)} branches)")
        if not all(math.isfinite(w) for w in self.weights) or not math.isclose(sum(self.weights), 1.0, abs_tol=1e-9):
            raise fail("guidance.weights", self.weights, "must be finite and sum to 1 (an affine combination)")
        if len(self.branches) == 2:  # the paper's D_weak + w·(D_strong − D_weak)
            check_guidance_scale("guidance.scale", self.weights[1])
        if not isinstance(self.share_prefix, bool):
            raise fail("guidance.share_prefix", self.share_prefix, "must be true or false")
        object.__setattr__(self, "interval", check_time_interval("guidance.interval", self.interval))

    @property
    def strong(self) -> Branch:
        return self.branches[-1]

    @property
    def weak(self) -> Branch | None:
        """The weak branch of a two-branch rule (``None`` for one branch)."""
        return self.branches[0] if len(self.branches) == 2 else None

    @property
    def scale(self) -> float:
        """w: the weight of the strong branch (1 when unguided)."""
        return self.weights[-1]

    @property
    def models(self) -> set[str]:
        """Model names the rule needs (keys of the ``models`` mapping)."""
        return {b.model for b in self.branches}

    @property
    def needs_random_labels(self) -> bool:
        """Whether a branch conditions on a random class (ICG): ``evaluate`` then needs ``random_labels``."""
        return any(b.random_label for b in self.branches)

    def guided_at(self, t: float) -> bool:
        if self.weights[-1] == 1.0 and not any(self.weights[:-1]):
            return False
        return self.interval is None or self.interval[0] <= t <= self.interval[1]

    def passes(self, step: int, num_steps: int, t: float) -> list[Pass]:
        """Passes of one evaluation at time t: every branch in order when guided, else the strong one."""
        if not self.guided_at(t):
            return [self.strong.at(step, num_steps)]
        return [b.at(step, num_steps) for b in self.branches]

    def shares_prefix(self, passes: list[Pass]) -> bool:
        """Whether ``passes`` (one evaluation) run their common dense prefix once."""
        return self.share_prefix and can_share_prefix(passes)

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Outputs of ``passes`` in the same order -> D_0 + Σ_{i≥1} a_i·(D_i − D_0)."""
        return combine(self.weights[1:], outputs)

    def __str__(self) -> str:
        interval = f", t∈[{self.interval[0]:g}, {self.interval[1]:g}]" if self.interval else ""
        if len(self.branches) == 1:
            return f"{self.name}: {self.strong}"
        if len(self.branches) == 2:
            weak, strong = self.branches
            return f"{self.name}: {weak} + {self.scale:g}·({strong} − {weak}){interval}"
        terms = " + ".join(f"{w:g}·{b}" for w, b in zip(self.weights, self.branches, strict=True))
        return f"{self.name}: {terms}{interval}"

    def to_dict(self) -> dict:
        """Flat description for logs and tracking."""
        return {
            "rule": self.name,
            "scale": self.scale,
            "strong": str(self.strong),
            "weak": "; ".join(str(b) for b in self.branches[:-1]) or None,
            "weights": list(self.weights),
            "interval": list(self.interval) if self.interval else None,
            "share_prefix": self.share_prefix,
        }


def can_share_prefix(passes: list[Pass]) -> bool:
    """Passes of one model with the same label choice: they agree on everything
    (x_t, t, conditioning) up to the first block that any of them routes."""
    if len(passes) < 2:
        return False
    first = passes[0]
    return all(
        (p.model, p.conditional, p.random_label) == (first.model, first.conditional, first.random_label) for p in passes
    )


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
    dropout would draw once per pass). The routing masks are drawn in the same
    order as without sharing, so the result is bit-identical.
    """
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    passes = rule.passes(step, num_steps, t)
    model = models[passes[0].model]
    one_model = all(p.model == passes[0].model for p in passes)
    if one_model and not model.training and getattr(model, "compile_options", None):
        return _compiled_step(rule, model, x, t_batch, passes, labels, generator, random_labels)
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


def _compiled_step(rule, model, x, t_batch, passes, labels, generator, random_labels) -> torch.Tensor:
    """``evaluate`` for a model with ``compile_core``: the draws eagerly, in the order of the eager
    path (pass by pass), then every pass and the combination as one compiled call."""
    ys = [_pass_labels(p, model, labels, random_labels) for p in passes]
    num_prefix = model.shared_prefix_blocks([p.sparsity for p in passes]) if rule.shares_prefix(passes) else 0
    keeps = [model.choose_tokens(x.shape[0], p.sparsity, generator, None, x.device, num_prefix) for p in passes]
    # A tensor, not constants: another scale reuses the graph.
    weights = torch.tensor(rule.weights[1:], device=x.device, dtype=torch.float32)
    return model.run(guided_passes, x, t_batch, ys, keeps, num_prefix, weights)


# ----------------------------------------------------------------------------- the named rules


@dataclass(frozen=True)
class Rule:
    """A named two-branch rule, D_weak + w·(D_strong − D_weak), as data.

    ``weak``: the weak branch's template (its γ comes from ``gamma_weak``); ``None``: one pass.
    ``reads``: which of ``gamma_strong``/``gamma_weak`` set the branches' γ (a rule that reads
    none runs dense passes and refuses a γ). ``ordered``: both branches on one model with
    one label (SG), so the weak one must be the sparser: γ_s < γ_w, and crossing schedules
    warn. ``names``: (dense, sparse) when the name follows the γ (AG+SG at γ = 0 is AG).
    """

    label: str  # how plots and reports name it
    weak: Branch | None = None
    reads: tuple[str, ...] = ()
    ordered: bool = False
    names: tuple[str, str] | None = None

    @property
    def needs_weak_model(self) -> bool:
        return self.weak is not None and self.weak.model != "main"

    def build(self, name, scale, gamma_strong=0.0, gamma_weak=0.0, interval=None, share_prefix=True) -> Guidance:
        gammas = {
            "gamma_strong": as_schedule(gamma_strong, "gamma_strong"),
            "gamma_weak": as_schedule(gamma_weak, "gamma_weak"),
        }
        if not self.reads and any(g != Constant() for g in gammas.values()):
            raise fail("guidance", name, f"plain {name.upper()} runs dense passes; use 'cfg_sg' for sparse branches")
        strong, weak = (gammas[k] if k in self.reads else Constant() for k in ("gamma_strong", "gamma_weak"))
        if self.weak is None:
            return Guidance(name, (Branch(sparsity=strong),), (1.0,), share_prefix=share_prefix)
        if self.ordered and isinstance(strong, Constant) and isinstance(weak, Constant) and strong.value >= weak.value:
            raise fail(
                "gamma_strong",
                strong.value,
                f"Sparse Guidance needs gamma_strong < gamma_weak (gamma_weak={weak.value})",
            )
        if self.names:
            name = self.names[0] if strong == weak == Constant() else self.names[1]
        branches = (replace(self.weak, sparsity=weak), Branch(sparsity=strong))
        rule = Guidance(name, branches, (1.0 - scale, scale), interval, share_prefix)
        crossing = schedule_crossing(strong, weak) if self.ordered else None
        if crossing is not None:
            warnings.warn(
                f"{rule}: gamma_strong={strong} and gamma_weak={weak} cross at t≈{1 - crossing:.2f} "
                f"({crossing:.0%} of the sampling steps): on one model the guidance direction reverses there. "
                "The paper's crossing schedules (SG_FID) guide with another checkpoint: rule ag_sg",
                CrossingScheduleWarning,
                stacklevel=4,
            )
        return rule


SPARSE = ("gamma_strong", "gamma_weak")
AG_NAMES = ("ag", "ag_sg")  # AutoGuidance at γ = 0, AG+SG otherwise

RULES: dict[str, Rule] = {
    "none": Rule("unguided", reads=("gamma_strong",)),
    "cfg": Rule("CFG", Branch(conditional=False)),
    "icg": Rule("ICG", Branch(random_label=True)),
    "sg": Rule("SG", Branch(), reads=SPARSE, ordered=True),
    "cfg_sg": Rule("CFG+SG", Branch(conditional=False), reads=SPARSE),
    "ag": Rule("AG", Branch(model="weak"), reads=SPARSE, names=AG_NAMES),
    "ag_sg": Rule("AG+SG", Branch(model="weak"), reads=SPARSE, names=AG_NAMES),
}


def build_guidance(
    rule: str,
    scale: float = 1.0,
    gamma_strong: float | str | Schedule = 0.0,
    gamma_weak: float | str | Schedule = 0.0,
    interval: tuple[float, float] | None = None,
    share_prefix: bool = True,
) -> Guidance:
    """A rule of ``RULES`` by name, for configs and command lines (``none`` reads ``gamma_strong``).

    ``share_prefix=False`` runs every pass in full even where the passes could share
    their dense prefix (see the module docstring)."""
    check_choice("guidance", rule, list(RULES))
    if rule != "none":
        check_guidance_scale("guidance.scale", scale)
    return RULES[rule].build(rule, scale, gamma_strong, gamma_weak, interval, share_prefix)


def unguided(sparsity: float | str | Schedule = 0.0) -> Guidance:
    """D(c; γ): one conditional pass (γ=0: the dense network)."""
    return build_guidance("none", gamma_strong=sparsity)


def cfg(scale: float, interval: tuple[float, float] | None = None) -> Guidance:
    """Classifier-free guidance: D(∅;0) + w·(D(c;0) − D(∅;0))."""
    return build_guidance("cfg", scale, interval=interval)


def icg(scale: float, interval: tuple[float, float] | None = None) -> Guidance:
    """Independent condition guidance (Sadat et al. 2024): D(c̃;0) + w·(D(c;0) − D(c̃;0)),
    c̃ a uniformly random class per sample, fixed over its trajectory (module docstring).
    Two dense passes per step like CFG; they differ in label, so no prefix is shared."""
    return build_guidance("icg", scale, interval=interval)


def sparse_guidance(scale, strong_sparsity=0.5, weak_sparsity=0.9, interval=None, share_prefix=True) -> Guidance:
    """Sparse Guidance (Eq. 7): D(c;γ_w) + w·(D(c;γ_s) − D(c;γ_w)), both conditional, γ_s < γ_w.

    Both branches see the same x_t and label, so by default the blocks before the first
    routed block run once (``share_prefix``; bit-identical either way)."""
    return build_guidance("sg", scale, strong_sparsity, weak_sparsity, interval, share_prefix)


def cfg_sparse_guidance(scale, strong_sparsity=0.0, weak_sparsity=0.5, interval=None) -> Guidance:
    """CFG + SG (Eq. 8): D(∅;γ_w) + w·(D(c;γ_s) − D(∅;γ_w))."""
    return build_guidance("cfg_sg", scale, strong_sparsity, weak_sparsity, interval)


def autoguidance(scale, strong_sparsity=0.0, weak_sparsity=0.0, interval=None) -> Guidance:
    """AutoGuidance, weak branch = model ``"weak"`` (an earlier or smaller checkpoint);
    with non-zero sparsities it is AG+SG (the paper's SG_FID setting uses cosine
    0.6→0 on the weak branch and 0→0.6 on the strong one)."""
    return build_guidance("ag_sg", scale, strong_sparsity, weak_sparsity, interval)
