"""Guidance rules: formulas on a real model, pass lists, schedules, bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import randomize, small_config

from sgexp.diffusion import (
    Branch,
    Constant,
    Cosine,
    CrossingScheduleWarning,
    Guidance,
    Pass,
    Sampler,
    autoguidance,
    build_guidance,
    cfg,
    cfg_sparse_guidance,
    generate,
    icg,
    sparse_guidance,
    unguided,
)
from sgexp.diffusion.guidance import as_schedule, evaluate
from sgexp.diffusion.seeds import random_labels, sample_labels
from sgexp.models import DiT

NULL = 5  # small_config has 5 classes
RANDOM = torch.tensor([3, 0, 4, 1])  # ICG's random classes for the four samples of ``xy`` (none equals its label)


@pytest.fixture
def models():
    return {
        "main": randomize(DiT(small_config()), seed=0).eval(),
        "weak": randomize(DiT(small_config()), seed=1).eval(),
    }


def gens(seed=0, n=4):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def D(models, x, t, y, model="main", label=True, gamma=0.0, generator=None, labels=None):
    """One direct network call, outside any guidance code (``labels`` replaces y, e.g. ICG's c̃)."""
    labels = labels if labels is not None else y if label else torch.full_like(y, NULL)
    return models[model](x, torch.full((x.shape[0],), t), labels, sparsity=gamma, generator=generator)


@pytest.fixture
def xy():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize(
    "rule,weak,strong",
    [
        (cfg(3.0), dict(label=False), dict()),
        (icg(3.0), dict(labels=RANDOM), dict()),
        (sparse_guidance(3.0, 0.25, 0.75), dict(gamma=0.75), dict(gamma=0.25)),
        (cfg_sparse_guidance(3.0, 0.0, 0.5), dict(label=False, gamma=0.5), dict(gamma=0.0)),
        (autoguidance(3.0), dict(model="weak"), dict()),
        (autoguidance(3.0, 0.25, 0.5), dict(model="weak", gamma=0.5), dict(gamma=0.25)),
    ],
    ids=["cfg", "icg", "sg", "cfg_sg", "ag", "ag_sg"],
)
def test_rule_matches_its_formula(models, xy, rule, weak, strong):
    x, y = xy
    out = evaluate(rule, models, x, 0.6, y, step=0, num_steps=10, generator=gens(), random_labels=RANDOM)
    # The rule runs weak then strong; replay the same generators in that order.
    g = gens()
    d_weak = D(models, x, 0.6, y, generator=g, **weak)
    d_strong = D(models, x, 0.6, y, generator=g, **strong)
    torch.testing.assert_close(out, d_weak + 3.0 * (d_strong - d_weak), rtol=0, atol=0)
    assert not torch.allclose(out, d_strong, atol=1e-3)  # guidance really moved the prediction


def test_sg_is_conditional_in_both_branches(models, xy):
    passes = sparse_guidance(2.0, 0.5, 0.9).passes(0, 40, 0.5)
    assert passes == [Pass("main", True, 0.9), Pass("main", True, 0.5)]
    assert cfg_sparse_guidance(2.0, 0.0, 0.5).passes(0, 40, 0.5) == [Pass("main", False, 0.5), Pass("main", True, 0.0)]


@pytest.mark.parametrize("rule", [cfg(1.0), sparse_guidance(1.0, 0.25, 0.75), autoguidance(1.0, 0.25, 0.5)])
def test_scale_one_gives_the_strong_branch(models, xy, rule):
    x, y = xy
    assert len(rule.passes(0, 10, 0.5)) == 1
    out = evaluate(rule, models, x, 0.5, y, 0, 10, generator=gens())
    strong = rule.strong.at(0, 10)
    expected = D(models, x, 0.5, y, model=strong.model, gamma=strong.sparsity, generator=gens())
    assert torch.equal(out, expected)


def test_unguided_is_one_conditional_pass(models, xy):
    x, y = xy
    assert unguided().passes(3, 10, 0.2) == [Pass("main", True, 0.0)]
    torch.testing.assert_close(evaluate(unguided(), models, x, 0.2, y, 3, 10), D(models, x, 0.2, y), rtol=0, atol=0)


class Recorder(torch.nn.Module):
    """Wraps a model and records every call as a Pass."""

    def __init__(self, name, model, log):
        super().__init__()
        self.name, self.model, self.log = name, model, log
        self.null_label = model.null_label

    def forward(self, x, t, y, sparsity=None, generator=None):
        conditional = bool((y != self.null_label).all())
        assert conditional or bool((y == self.null_label).all())
        self.log.append(Pass(self.name, conditional, sparsity))
        return self.model(x, t, y, sparsity=sparsity, generator=generator)


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize(
    "rule",
    [
        cfg(2.0, interval=(0.2, 0.7)),
        sparse_guidance(4.0, "cosine:0:0.5", "cosine:0.9:0.6"),
        autoguidance(2.0, "cosine:0:0.6", "cosine:0.6:0"),
        cfg_sparse_guidance(1.5, 0.0, 0.5, interval=(0.0, 0.5)),
    ],
    ids=["cfg_interval", "sg_cosine", "ag_sg", "cfg_sg_interval"],
)
def test_pass_lists_match_what_is_called(models, xy, rule, solver):
    log: list[Pass] = []
    wrapped = {name: Recorder(name, m, log) for name, m in models.items()}
    sampler = Sampler(solver, 6)
    x, y = xy
    sampler.sample(rule, wrapped, x, y, generator=gens())
    expected = [p for step, t in sampler.evaluation_points() for p in rule.passes(step, sampler.num_steps, t)]
    assert log == expected
    # The schedule or the interval really varied the passes between evaluations.
    per_evaluation = [tuple(rule.passes(step, sampler.num_steps, t)) for step, t in sampler.evaluation_points()]
    assert len(set(per_evaluation)) > 1


def test_interval_runs_one_pass_outside():
    rule = cfg(2.0, interval=(0.2, 0.7))
    assert len(rule.passes(0, 10, 0.9)) == 1
    assert len(rule.passes(5, 10, 0.5)) == 2
    assert len(rule.passes(9, 10, 0.1)) == 1


def test_schedules():
    cos = Cosine(0.6, 0.0)
    values = [cos(i, 40) for i in range(40)]
    assert values[0] == pytest.approx(0.6) and values[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[20] == pytest.approx(0.3 * (1 + math.cos(math.pi * 20 / 39)))
    assert Constant(0.3)(7, 40) == 0.3
    assert as_schedule("cosine:0:0.6") == Cosine(0.0, 0.6)
    assert as_schedule(0.5) == Constant(0.5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: cfg(0.5), r"guidance.scale=0.5 is invalid: guidance scale must be >= 1"),
        (lambda: sparse_guidance(2.0, 0.9, 0.5), r"gamma_strong=0.9 is invalid: .*gamma_strong < gamma_weak"),
        (lambda: sparse_guidance(2.0, 0.5, 0.5), r"gamma_strong=0.5 is invalid"),
        (lambda: sparse_guidance(2.0, 0.5, 1.0), r"gamma_weak=1.0 is invalid: sparsity must be in \[0, 1\)"),
        (lambda: sparse_guidance(2.0, "cosine:0:1.2", 0.5), r"sparsity.end=1.2 is invalid"),
        (
            lambda: sparse_guidance(2.0, "cosine:0", 0.5),
            r"gamma_strong='cosine:0' is invalid: expected 'cosine:START:END'",
        ),
        (lambda: cfg(2.0, interval=(0.8, 0.2)), r"guidance.interval=\(0.8, 0.2\) is invalid"),
        (lambda: build_guidance("pag", 2.0), r"guidance='pag' is invalid: must be one of"),
        (lambda: build_guidance("cfg", 2.0, 0.5, 0.9), r"guidance='cfg' is invalid: .*use 'cfg_sg'"),
    ],
)
def test_bad_guidance_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_crossing_schedules_on_one_model_warn_naming_the_setting_and_t():
    with pytest.warns(CrossingScheduleWarning) as caught:
        rule = build_guidance("sg", 5.0, "cosine:0:0.6", "cosine:0.6:0")  # configs/guidance/sg_cosine.yaml
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "gamma_strong=cosine:0:0.6 and gamma_weak=cosine:0.6:0 cross at t≈0.50" in message
    assert message.startswith(str(rule)) and "ag_sg" in message
    assert rule.passes(39, 40, 0.0)[0].sparsity == pytest.approx(0.0)  # allowed: the weak branch is denser at the end
    with pytest.warns(CrossingScheduleWarning, match=r"cross at t≈0.33 \(67% of the sampling steps\)"):
        sparse_guidance(2.0, "cosine:0:0.5", "cosine:0.75:0.25")
    with warnings.catch_warnings():  # schedules that do not cross, and crossing ones on another weak model
        warnings.simplefilter("error")
        sparse_guidance(2.0, "cosine:0:0.3", "cosine:0.9:0.6")
        sparse_guidance(2.0, 0.3, "cosine:0.9:0.4")
        autoguidance(2.0, "cosine:0:0.6", "cosine:0.6:0")
        cfg_sparse_guidance(2.0, "cosine:0:0.6", "cosine:0.6:0")


class LabelRecorder(torch.nn.Module):
    """Records the labels of every call."""

    def __init__(self, model, log):
        super().__init__()
        self.model, self.log, self.null_label = model, log, model.null_label

    def forward(self, x, t, y, sparsity=None, generator=None):
        self.log.append(y.clone())
        return self.model(x, t, y, sparsity=sparsity, generator=generator)


def test_icg_random_class_comes_from_the_per_index_seeds_and_is_fixed_over_the_trajectory(models):
    log: list[torch.Tensor] = []
    wrapped = {"main": LabelRecorder(models["main"], log)}
    sampler, shape, indices = Sampler("heun", 3), (3, 8, 8), list(range(6))
    full, labels = generate(sampler, icg(2.0), wrapped, indices, shape, num_classes=5, base_seed=7)
    c_rand = random_labels(indices, 5, base_seed=7)
    assert labels.tolist() == [0, 1, 2, 3, 4, 0] and len(set(c_rand.tolist())) > 1
    # Every evaluation runs the weak pass on c̃ (the same at every step) and then the strong pass on c.
    assert len(log) == 2 * len(sampler.evaluation_points())
    assert all(torch.equal(y, c_rand) for y in log[0::2]) and all(torch.equal(y, labels) for y in log[1::2])
    # Per index: the same c̃ and the same sample whatever the batch; c̃ has its own stream, not the label's.
    assert torch.equal(torch.cat([random_labels([i], 5, 7) for i in indices]), c_rand)
    assert not torch.equal(random_labels(range(64), 5, 7), sample_labels(range(64), 5, 7, "uniform"))
    parts = [generate(sampler, icg(2.0), models, batch, shape, 5, base_seed=7)[0] for batch in ([0, 1, 2, 3], [4, 5])]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"random_labels=None is invalid: guidance 'icg' needs a random class"):
        sampler.sample(icg(2.0), models, torch.zeros(1, *shape), labels[:1])


def test_icg_is_dense_and_unshared():
    passes = icg(1.5).passes(0, 40, 0.5)
    assert passes == [Pass("main", True, 0.0, random_label=True), Pass("main", True, 0.0)]
    assert not icg(1.5).shares_prefix(passes) and icg(1.5).needs_random_labels and not cfg(1.5).needs_random_labels
    assert str(icg(1.5)) == "icg: D(c̃; γ=0) + 1.5·(D(c; γ=0) − D(c̃; γ=0))"
    with pytest.raises(ValueError, match=r"guidance='icg' is invalid: plain ICG runs dense passes"):
        build_guidance("icg", 2.0, 0.5, 0.9)


def test_missing_weak_model_fails_before_sampling(models, xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"models=\['main'\] is invalid: guidance 'ag' needs models"):
        Sampler("euler", 2).sample(autoguidance(2.0), {"main": models["main"]}, x, y)


def test_a_settings_crossing_warning_names_the_setting():
    from sgexp.eval.settings import make_settings

    spec = {"rule": "sg", "scale": 3.0, "gamma_strong": "cosine:0:0.6", "gamma_weak": "cosine:0.6:0"}
    with pytest.warns(CrossingScheduleWarning, match=r"guidance setting 'sg_cosine': .* cross at t≈0.50"):
        make_settings({"sg_cosine": spec})


def test_a_three_branch_rule_is_data_alone(models, xy):
    """CFG on top of SG, written as one ``Guidance`` and nothing else: guide from the null label to a
    sparse conditional prediction, and from there to a dense one,
    D(∅;0) + w1·(D(c;0.75) − D(∅;0)) + w2·(D(c;0.25) − D(c;0.75))."""
    w1, w2 = 1.5, 3.0
    branches = (Branch(conditional=False), Branch(sparsity=Constant(0.75)), Branch(sparsity=Constant(0.25)))
    rule = Guidance("cfg_then_sg", branches, weights=(1 - w1, w1 - w2, w2))
    assert str(rule) == "cfg_then_sg: -0.5·D(∅; γ=0) + -1.5·D(c; γ=0.75) + 3·D(c; γ=0.25)"
    assert rule.passes(0, 10, 0.6) == [Pass("main", False, 0.0), Pass("main", True, 0.75), Pass("main", True, 0.25)]
    x, y = xy
    out = evaluate(rule, models, x, 0.6, y, step=0, num_steps=10, generator=gens())
    g = gens()  # the passes run in branch order: replay the generators in that order
    d_null = D(models, x, 0.6, y, label=False, generator=g)
    d_sparse = D(models, x, 0.6, y, gamma=0.75, generator=g)
    d_dense = D(models, x, 0.6, y, gamma=0.25, generator=g)
    torch.testing.assert_close(out, d_null + w1 * (d_sparse - d_null) + w2 * (d_dense - d_sparse), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"guidance.weights=\(0.5, 0.6\) is invalid: .*sum to 1"):
        Guidance("bad", branches[1:], (0.5, 0.6))


def test_three_conditional_branches_share_their_prefix_bit_identically(models, xy):
    """Three sparsities of one model and label: the dense prefix runs once for all three."""
    branches = tuple(Branch(sparsity=Constant(g)) for g in (0.9, 0.75, 0.25))
    shared = Guidance("sg3", branches, (-1.0, -1.0, 3.0))
    separate = Guidance("sg3", branches, (-1.0, -1.0, 3.0), share_prefix=False)
    assert shared.shares_prefix(shared.passes(0, 10, 0.5)) and not separate.shares_prefix(separate.passes(0, 10, 0.5))
    x, y = xy
    a = evaluate(shared, models, x, 0.5, y, 0, 10, generator=gens())
    b = evaluate(separate, models, x, 0.5, y, 0, 10, generator=gens())
    assert torch.equal(a, b)
