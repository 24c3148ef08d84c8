"""Shared fixtures: small real models with non-trivial weights.

DiT's adaLN-Zero initialisation makes every block the identity and the output
zero, which would make most equalities hold trivially; the fixtures therefore
re-draw all weights from a seeded normal distribution.
"""

from __future__ import annotations

import pytest
import torch

from sgexp.models import DiT, DiTConfig, Route


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def small_config(**overrides) -> DiTConfig:
    """8×8×3 input, patch 2 -> 16 tokens, depth 6, one route 1..3."""
    kwargs = dict(
        input_size=8,
        in_channels=3,
        patch_size=2,
        hidden_size=32,
        depth=6,
        num_heads=4,
        num_classes=5,
        class_dropout_prob=0.1,
        routes=(Route(1, 3, 0.5),),
    )
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


@pytest.fixture
def model() -> DiT:
    return randomize(DiT(small_config())).eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    y = torch.tensor([0, 1, 4, 5])  # 5 is the null label
    return x, t, y
