"""Training callbacks: throughput, model FLOPs utilisation and routing savings.

The guided-sampling evaluation lives in ``sgexp.lit.eval_callback``, checkpoint writing in
``sgexp.lit.checkpointing``, stopping on signals in ``sgexp.lit.stop``.
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer

from sgexp.checks import check_positive_int
from sgexp.flops import peak_flops, train_flops
from sgexp.models.dit import DiTConfig
from sgexp.progress import format_seconds

log = logging.getLogger(__name__)


def block_spans(config: DiTConfig) -> list[tuple[int, int]]:
    """The depth cut into dense stretches and routes: [(0, 0), (1, 3), (4, 5)] for route 1..3 of 6 blocks."""
    spans, start = [], 0
    for r in config.routes:
        if r.start > start:
            spans.append((start, r.start - 1))
        spans.append((r.start, r.end))
        start = r.end + 1
    if start < config.depth:
        spans.append((start, config.depth - 1))
    return spans


def routing_savings(config: DiTConfig) -> float:
    """Fraction of block FLOPs (token-linear part) that routing at γ_train saves."""
    train = config.tokens_per_block(tuple(r.sparsity for r in config.routes))
    return 1.0 - sum(train) / (config.num_tokens * config.depth)


class TrainingMonitor(L.Callback):
    """Every ``every_n_steps``: images/s, tokens/s of each block span, routing savings, and the
    model FLOPs achieved: ``train/tflops_per_s`` (``sgexp.flops.train_flops``: 3 × forward, attention
    included, at γ_train) and ``train/mfu``, that over the peak of all devices (``sgexp.flops.peak_flops``:
    by CUDA device name, or ``$SGEXP_PEAK_TFLOPS``; not logged when unknown, e.g. on a CPU).

    Throughput counts every rank (global images/s) and wall time between batch
    ends, data loading included: what a researcher pays for.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = check_positive_int("callbacks.monitor_every_n_steps", every_n_steps)
        self._t0: float | None = None
        self._images = 0
        self._peak: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        config = pl_module.config
        pl_module.log("train/block_flops_saved", routing_savings(config), rank_zero_only=True)
        device = pl_module.device
        peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        self._peak = peak * trainer.world_size if peak else None
        self._t0, self._images = time.perf_counter(), 0
        self._start, self._start_step = self._t0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += batch[0].shape[0] * trainer.world_size
        step = trainer.global_step
        if step % self.every_n_steps or self._t0 is None:
            return
        elapsed = time.perf_counter() - self._t0
        images_per_s = self._images / max(elapsed, 1e-9)
        config = pl_module.config
        tokens = config.tokens_per_block(tuple(r.sparsity for r in config.routes))
        metrics = {"train/images_per_s": images_per_s, "train/block_flops_saved": routing_savings(config)}
        achieved = images_per_s * train_flops(config)  # model FLOP/s, all ranks
        metrics["train/tflops_per_s"] = achieved / 1e12
        if self._peak:
            metrics["train/mfu"] = achieved / self._peak
        for a, b in block_spans(config):
            metrics[f"train/tokens_per_s/blocks_{a}-{b}"] = images_per_s * tokens[a]
        pl_module.log_dict(metrics, rank_zero_only=True)
        if trainer.progress_bar_callback is None and trainer.is_global_zero:  # batch jobs: a line in the log
            loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else float("nan")
            eta = format_seconds(self.seconds_left(trainer))
            log.info("step %d/%d: loss %.4f, %.0f images/s, ETA %s", step, trainer.max_steps, loss, images_per_s, eta)
        self._t0, self._images = time.perf_counter(), 0

    def seconds_left(self, trainer) -> float:
        """Until ``max_steps`` at this start's mean time per step (evaluations and checkpoints included), or
        until ``trainer.max_time`` if that ends training first; nan with neither (``format_seconds``: ``?``)."""
        steps, left = trainer.global_step - self._start_step, math.nan
        if trainer.max_steps > 0 and steps > 0:
            left = (trainer.max_steps - trainer.global_step) * (time.perf_counter() - self._start) / steps
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        if remaining is not None:
            left = remaining if math.isnan(left) else min(left, remaining)
        return left
