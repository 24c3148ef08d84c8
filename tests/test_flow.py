"""Flow-matching maths: interpolant, velocity, timesteps, loss, and that a model learns."""

from __future__ import annotations

import pytest
import torch

from sgexp.diffusion import FlowMatching, interpolate, logit_normal_timesteps, predict_data, velocity_target
from sgexp.models import build_model


def test_interpolant_endpoints_and_velocity():
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    assert torch.equal(interpolate(x0, noise, torch.zeros(2)), x0)  # t = 0: data
    assert torch.equal(interpolate(x0, noise, torch.ones(2)), noise)  # t = 1: noise
    t, h = torch.tensor([0.3, 0.8]), 1e-3
    finite_difference = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, velocity_target(x0, noise), atol=1e-3, rtol=0)
    x_t = interpolate(x0, noise, t)
    torch.testing.assert_close(predict_data(x_t, velocity_target(x0, noise), t), x0)


def test_logit_normal_timesteps():
    t = logit_normal_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    shifted = logit_normal_timesteps(20000, mean=1.0, generator=torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)


def test_loss_is_the_velocity_mse():
    model = build_model("SiT-Micro/2", input_size=8, in_channels=1, num_classes=3).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x0, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = FlowMatching().loss(model, x0, y, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    t = torch.sigmoid(torch.randn(4, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    expected = ((model(interpolate(x0, noise, t), t, y) - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_a_routed_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("SiT-Micro/2", input_size=8, in_channels=1, num_classes=2).train()
    x0 = torch.stack([torch.ones(1, 8, 8), -torch.ones(1, 8, 8)]).repeat(8, 1, 1, 1)
    y = torch.tensor([0, 1]).repeat(8)
    objective, opt = FlowMatching(), torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = objective.loss(model, x0, y, generator=gen)  # routing on (γ_train = 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.5  # starts near E|ε − x₀|² = 2 (the model outputs 0 at init)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_bad_timestep_std():
    with pytest.raises(ValueError, match="t_std=0.0 is invalid"):
        FlowMatching(t_std=0.0)
