"""Rectified-flow / flow-matching maths (Lipman et al. 2023; Liu et al. 2023; SiT).

Time runs from data to noise: ``x_t = (1 - t)·x_0 + t·ε``, t ∈ [0, 1], t = 0 is
data, t = 1 is noise. The network regresses the velocity ``v = dx_t/dt = ε - x_0``
and sampling integrates dx/dt = v from t = 1 down to t = 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sgexp.checks import fail


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) so that t broadcasts over an image batch."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The linear interpolant x_t = (1 − t)·x_0 + t·ε."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt = ε − x_0, the regression target."""
    return noise - x0


def predict_data(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_0 implied by a velocity at (x_t, t): x_0 = x_t − t·v."""
    return x_t - _expand(t, x_t) * v


def logit_normal_timesteps(
    batch: int, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """t = sigmoid(u), u ~ N(mean, std²) (SD3's logit-normal), which concentrates
    training on intermediate noise levels where the velocity is hardest to predict."""
    u = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * u)


@dataclass(frozen=True)
class FlowMatching:
    """Training objective: MSE between predicted and true velocity over all tokens.

    With routing on, skipped tokens also enter the loss: their output comes from
    the blocks outside the route, and TREAD's point is that they still learn.
    """

    t_mean: float = 0.0
    t_std: float = 1.0

    def __post_init__(self) -> None:
        if not self.t_std > 0:
            raise fail("t_std", self.t_std, "must be > 0")

    def loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """Mean squared velocity error of ``model(x_t, t, labels, generator=generator, **model_kwargs)``.

        ``generator`` drives every random draw of the step (t, ε, and, through the
        model, routing masks and label dropout), so a step is a pure function of
        the weights, the batch and the generator's seed.
        """
        t = logit_normal_timesteps(x0.shape[0], self.t_mean, self.t_std, generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = interpolate(x0, noise, t)
        v = model(x_t, t, labels, generator=generator, **model_kwargs)
        return torch.mean((v.float() - velocity_target(x0, noise).float()) ** 2)
