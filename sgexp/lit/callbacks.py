"""Training callbacks: throughput and routing savings.

The guided-sampling evaluation lives in ``sgexp.lit.eval_callback``, checkpoint writing in
``sgexp.lit.checkpointing``, stopping on signals in ``sgexp.lit.stop``.
"""

from __future__ import annotations

import logging
import time

import lightning as L

from sgexp.checks import check_positive_int
from sgexp.models.dit import DiTConfig

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
    """Every ``every_n_steps``: images/s, tokens/s of each block span, routing savings.

    Throughput counts every rank (global images/s) and wall time between batch
    ends, data loading included: what a researcher pays for.
    """

    def __init__(self, every_n_steps: int = 50):
        self.every_n_steps = check_positive_int("callbacks.monitor_every_n_steps", every_n_steps)
        self._t0: float | None = None
        self._images = 0

    def on_train_start(self, trainer, pl_module) -> None:
        config = pl_module.config
        pl_module.log("train/block_flops_saved", routing_savings(config), rank_zero_only=True)
        self._t0, self._images = time.perf_counter(), 0

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
        for a, b in block_spans(config):
            metrics[f"train/tokens_per_s/blocks_{a}-{b}"] = images_per_s * tokens[a]
        pl_module.log_dict(metrics, rank_zero_only=True)
        if trainer.progress_bar_callback is None and trainer.is_global_zero:  # batch jobs: a line in the log
            loss = outputs["loss"].item() if isinstance(outputs, dict) and "loss" in outputs else float("nan")
            log.info("step %d/%d: loss %.4f, %.0f images/s", step, trainer.max_steps, loss, images_per_s)
        self._t0, self._images = time.perf_counter(), 0
