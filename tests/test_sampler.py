"""Samplers: per-index determinism, solver order, and the time direction on an exact flow."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize, small_config

from sgexp.diffusion import Sampler, generate, sparse_guidance, unguided
from sgexp.diffusion.seeds import index_seed, initial_noise, sample_labels
from sgexp.models import DiT

SHAPE = (3, 8, 8)


@pytest.fixture
def models():
    return {"main": randomize(DiT(small_config()), std=0.05).eval()}


def test_sample_is_the_same_whatever_the_batch(models):
    sampler, rule = Sampler("euler", 4), sparse_guidance(3.0, 0.25, 0.75)  # routed passes: masks matter
    full, labels = generate(sampler, rule, models, range(8), SHAPE, num_classes=5, base_seed=11)
    for batch in ([5, 2, 7], [0, 1, 3, 4, 6], [6]):
        part, part_labels = generate(sampler, rule, models, batch, SHAPE, num_classes=5, base_seed=11)
        assert torch.equal(part_labels, labels[batch])
        # Same noise, labels and masks; batched matmuls may reassociate sums (~1e-6 in fp32).
        torch.testing.assert_close(part, full[batch], rtol=0, atol=1e-5)
    again, _ = generate(sampler, rule, models, range(8), SHAPE, num_classes=5, base_seed=11)
    assert torch.equal(again, full)
    other, _ = generate(sampler, rule, models, range(8), SHAPE, num_classes=5, base_seed=12)
    assert not torch.allclose(other, full, atol=1e-2)


def test_routing_masks_follow_the_index(models):
    """Same noise and label but a different index seed -> different masks -> different SG sample."""
    sampler, rule = Sampler("euler", 3), sparse_guidance(3.0, 0.25, 0.75)
    labels = torch.tensor([1, 1])
    a, _ = generate(sampler, rule, models, [0, 1], SHAPE, 5, base_seed=0, labels=labels)
    noise = initial_noise([0], SHAPE, 0).expand(2, *SHAPE)
    b = sampler.sample(rule, models, noise, labels, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert not torch.allclose(b[0], b[1], atol=1e-4)  # same noise, different masks
    assert not torch.equal(a[0], a[1])


def test_seeds_and_labels():
    assert index_seed(0, 1, 0) != index_seed(0, 2, 0) != index_seed(1, 1, 0)
    assert index_seed(0, 1, 0) != index_seed(0, 1, 1)
    assert sample_labels(range(10), 5, 0).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    uniform = sample_labels(range(200), 5, 0, "uniform")
    assert torch.equal(sample_labels([150, 3], 5, 0, "uniform"), uniform[[150, 3]])
    assert set(uniform.tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="label_mode='random' is invalid"):  # one vocabulary: uniform
        sample_labels([0], 5, 0, "random")


class LinearVelocity(torch.nn.Module):
    """dx/dt = x, exact solution from t=1 to t=0: x(0) = x(1)·e⁻¹."""

    null_label = 0

    def forward(self, x, t, y, sparsity=None, generator=None):
        return x


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_solver_convergence_order(solver, order):
    x1 = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    exact = math.exp(-1.0)
    errors = [
        abs(Sampler(solver, n).sample(unguided(), {"main": LinearVelocity()}, x1, torch.zeros(1)).item() - exact)
        for n in (10, 20, 40)
    ]
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert coarse / fine == pytest.approx(2**order, rel=0.1)


class GaussianFlow(torch.nn.Module):
    """Exact velocity E[ε − x₀ | x_t] for data x₀ ~ N(μ, σ²) and x_t = (1−t)x₀ + tε."""

    null_label = 0

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, x, t, y, sparsity=None, generator=None):
        a, b = (1 - t).view(-1, 1, 1, 1), t.view(-1, 1, 1, 1)
        var = a**2 * self.sigma**2 + b**2
        centered = x - a * self.mu
        x0 = self.mu + a * self.sigma**2 / var * centered
        eps = b / var * centered
        return eps - x0


def test_integrating_from_noise_reaches_the_data_distribution():
    """Checks the conventions end to end: t=1 noise, t=0 data, v = ε − x₀."""
    noise = torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = Sampler("heun", 20).sample(unguided(), {"main": GaussianFlow(3.0, 0.5)}, noise, torch.zeros(20000))
    assert out.mean().item() == pytest.approx(3.0, abs=0.02)
    assert out.std().item() == pytest.approx(0.5, abs=0.02)


def test_evaluation_points():
    assert Sampler("euler", 4).evaluation_points() == [(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]
    assert len(Sampler("heun", 40).evaluation_points()) == 80
    assert Sampler().num_steps == 40 and Sampler().solver == "euler"


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(solver="dpm"), "solver='dpm' is invalid"), (dict(num_steps=0), "num_steps=0 is invalid")],
)
def test_bad_sampler(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kwargs)
