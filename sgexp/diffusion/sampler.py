"""ODE solvers that integrate the guided velocity from t = 1 (noise) to t = 0 (data).

The probability-flow ODE of the flow-matching interpolant is dx/dt = v(x, t).
Steps are uniform in t (``t_i = 1 − i/n``), as in the SG paper's Euler-40
protocol. Heun (EDM's 2nd-order solver, Karras et al. 2022, Alg. 1) corrects
each Euler step with the slope at its end point; with flow matching t = 0 is a
valid end point, so every step is corrected (2n evaluations).

``Sampler.evaluation_points`` lists (step, t) of every velocity evaluation; the
FLOPs model uses it to price a sampler without running it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.diffusion.guidance import Guidance, evaluate
from sgexp.diffusion.seeds import initial_noise, random_labels, routing_generators, sample_labels

SOLVERS = ("euler", "heun")


@dataclass(frozen=True)
class Sampler:
    """A solver and a number of steps: ``Sampler("euler", 40)``."""

    solver: str = "euler"
    num_steps: int = 40

    def __post_init__(self) -> None:
        check_choice("solver", self.solver, SOLVERS)
        check_positive_int("num_steps", self.num_steps)

    def time_grid(self) -> list[float]:
        """``num_steps + 1`` times from 1 down to 0."""
        n = self.num_steps
        return [1.0 - i / n for i in range(n + 1)]

    def evaluation_points(self) -> list[tuple[int, float]]:
        """(step, t) of each velocity evaluation, in order."""
        grid = self.time_grid()
        points = []
        for i in range(self.num_steps):
            points.append((i, grid[i]))
            if self.solver == "heun":
                points.append((i, grid[i + 1]))
        return points

    @torch.no_grad()
    def sample(
        self,
        rule: Guidance,
        models: Mapping[str, torch.nn.Module],
        noise: torch.Tensor,
        labels: torch.Tensor,
        generator=None,
        on_step: Callable[[int], None] | None = None,
        random_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integrate from ``noise`` (t=1) to a sample (t=0). noise (B, C, H, W), labels (B,).

        ``generator``: for the routing masks, one per image for per-index determinism.
        ``random_labels`` (B,): ICG's random class per sample, the same at every step.
        """
        missing = rule.models - set(models)
        if missing:
            raise fail("models", sorted(models), f"guidance '{rule.name}' needs models {sorted(rule.models)}")
        if rule.needs_random_labels and random_labels is None:
            raise fail("random_labels", None, f"guidance '{rule.name}' needs a random class per sample")
        grid = self.time_grid()
        n = self.num_steps
        x = noise
        for i in range(n):
            t, t_next = grid[i], grid[i + 1]
            v = evaluate(rule, models, x, t, labels, i, n, generator, random_labels)
            x_euler = x + (t_next - t) * v
            if self.solver == "heun":
                v_next = evaluate(rule, models, x_euler, t_next, labels, i, n, generator, random_labels)
                x = x + (t_next - t) * 0.5 * (v + v_next)
            else:
                x = x_euler
            if on_step is not None:
                on_step(i)
        return x


def generate(
    sampler: Sampler,
    rule: Guidance,
    models: Mapping[str, torch.nn.Module],
    indices: Sequence[int],
    shape: Sequence[int],
    num_classes: int,
    base_seed: int = 0,
    label_mode: str = "balanced",
    labels: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples for the given indices with per-index noise, labels, routing masks (and ICG's random classes).

    Returns (samples (B, *shape), labels (B,)). Sample ``i`` is the same whatever
    the batch it is generated in.
    """
    indices = list(indices)
    if labels is None:
        labels = sample_labels(indices, num_classes, base_seed, label_mode)
    noise = initial_noise(indices, shape, base_seed).to(device)
    generators = routing_generators(indices, base_seed)
    c_rand = random_labels(indices, num_classes, base_seed).to(device) if rule.needs_random_labels else None
    samples = sampler.sample(rule, models, noise, labels.to(device), generator=generators, random_labels=c_rand)
    return samples, labels
