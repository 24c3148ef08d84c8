"""Exponential moving average of the weights (Polyak averaging).

Diffusion models are evaluated with an EMA of their weights (DDPM, ADM, DiT,
EDM): the average over the last ~1/(1−decay) steps samples markedly better than
the raw weights. The EMA copy is a plain submodule of the LightningModule, so it
is saved in, and restored from, every checkpoint without extra code.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sgexp.checks import fail


class EMA(nn.Module):
    """``ema ← d·ema + (1 − d)·θ`` after every optimiser step.

    With ``warmup`` the decay at update n is ``min(decay, (1 + n) / (10 + n))``
    (the TensorFlow ExponentialMovingAverage ``num_updates`` rule): early
    averages forget the random initialisation quickly, which matters for the
    short runs of a CPU budget; long runs reach ``decay`` after a few thousand steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise fail("ema_decay", decay, "must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # e + (1−d)(θ − e) = d·e + (1−d)·θ
        self.num_updates += 1

    def train(self, mode: bool = True) -> EMA:
        """The averaged model is always in eval mode (no label dropout, dense by default)."""
        super().train(mode)
        self.model.eval()
        return self
