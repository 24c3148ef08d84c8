"""Training callbacks: throughput and routing savings, sample grids, a final checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from torchvision.utils import save_image

from sgexp.diffusion.guidance import build_guidance
from sgexp.diffusion.sampler import Sampler, generate
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
        self.every_n_steps = every_n_steps
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
        self._t0, self._images = time.perf_counter(), 0


class SampleGrid(L.Callback):
    """Sample grids from the EMA model every ``every_n_steps`` and at the end of training.

    One PNG per guidance setting, one column per class, under ``<run_dir>/samples``;
    also logged to MLflow when the trainer's logger is an ``MLFlowLogger``.
    ``settings``: dicts of ``build_guidance`` arguments plus a ``name``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        settings: list[dict],
        every_n_steps: int = 0,
        per_class: int = 10,
        num_steps: int = 40,
        seed: int = 0,
    ):
        self.out_dir = Path(out_dir)
        self.rules = {s["name"]: build_guidance(**{k: v for k, v in s.items() if k != "name"}) for s in settings}
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.sampler = Sampler("euler", num_steps)
        self.seed = seed
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.write(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    @torch.no_grad()
    def write(self, trainer, pl_module) -> list[Path]:
        if not trainer.is_global_zero:
            return []
        config = pl_module.config
        classes = min(config.num_classes, 10)
        # Row c holds class c: index i has label i mod num_classes under balanced labels.
        indices = [c + k * config.num_classes for k in range(self.per_class) for c in range(classes)]
        shape = (config.in_channels, config.input_size, config.input_size)
        paths = []
        for name, rule in self.rules.items():
            samples, _ = generate(
                self.sampler,
                rule,
                {"main": pl_module.ema.model},
                indices,
                shape,
                config.num_classes,
                base_seed=self.seed,
                device=pl_module.device,
            )
            path = self.out_dir / f"{name}_step{trainer.global_step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_image((samples.float().cpu() + 1) / 2, path, nrow=classes, padding=1)
            paths.append(path)
            logger = trainer.logger
            if logger is not None and hasattr(logger, "run_id") and hasattr(logger, "experiment"):
                logger.experiment.log_artifact(logger.run_id, str(path), "samples")
        log.info("sample grids: %s", ", ".join(str(p) for p in paths))
        self.written.extend(paths)
        return paths


class FinalCheckpoint(L.Callback):
    """Write ``last.ckpt`` when training ends, whatever step it ends at (max_steps or max_time)."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
