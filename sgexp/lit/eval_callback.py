"""``GuidedSamplingEval``: score the EMA model under several guidance settings during training;
``build_guided_eval`` makes it from the ``callbacks.guided_eval`` config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from sgexp.diffusion.sampler import Sampler
from sgexp.eval.sampling import Setting, save_grid, score_setting
from sgexp.eval.settings import make_settings  # noqa: F401  (moved; re-exported until callers move)

log = logging.getLogger(__name__)


class GuidedSamplingEval(L.Callback):
    """Every ``every_n_steps`` (if > 0) and at the end of training, for each setting:
    ``num_samples`` EMA samples on the same indices, metrics prefixed by the setting's
    name (``eval/sg/fid``, ``eval/sg/gflops_per_sample``, ...) and a sample grid.

    ``extractor`` is a built feature extractor with its ``reference`` statistics, or
    None for grids and timing only (e.g. before the dataset's classifier is trained).
    ``decode`` turns a latent model's samples into images in [-1, 1] (a
    ``sgexp.vae.LatentVAE``, moved to the model's device) before features and grids.
    Sampling is spread over all ranks; rank 0 logs.
    """

    def __init__(
        self,
        out_dir: str | Path,
        settings: Mapping[str, Mapping],
        extractor: torch.nn.Module | None = None,
        reference=None,
        num_samples: int = 500,
        batch_size: int = 250,
        num_steps: int = 40,
        seed: int = 0,
        grid_size: int = 100,
        every_n_steps: int = 0,
        decode=None,
    ):
        self.out_dir = Path(out_dir)
        self.decode = decode
        self.settings = make_settings(settings)
        self.extractor, self.reference = extractor, reference
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.sampler = Sampler("euler", num_steps)
        self.grid_size, self.every_n_steps = grid_size, every_n_steps
        self.rows: list[dict] = []
        self.grids: list[Path] = []
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer: L.Trainer, pl_module) -> list[dict]:
        step = trainer.global_step
        if step == self._last_step:  # already evaluated at this step
            return []
        self._last_step = step
        if self.extractor is not None:
            self.extractor.to(pl_module.device)
        if self.decode is not None:
            self.decode.to(pl_module.device)
        models, configs = {"main": pl_module.ema.model}, {"main": pl_module.config}
        rows = []
        for setting in self.settings:
            row, grid = score_setting(
                setting,
                models,
                configs,
                self.sampler,
                self.extractor,
                self.reference,
                self.num_samples,
                self.seed,
                self.batch_size,
                pl_module.device,
                self.decode,
                grid_size=self.grid_size,
            )
            row["step"] = step
            rows.append(row)
            if trainer.is_global_zero:
                self._report(trainer, setting, row, grid, step)
        self.rows.extend(rows)
        return rows

    def _report(self, trainer, setting: Setting, row: dict, grid, step: int) -> None:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        quality = f"{row['metric']} {row['fid']:.2f}, " if "fid" in row else ""
        log.info(
            "step %d %s: %s%.3g GFLOPs/sample, %.4f s/sample",
            step,
            setting.name,
            quality,
            row["gflops_per_sample"],
            row["seconds_per_sample"],
        )
        logger = trainer.logger
        if logger is not None:
            logger.log_metrics({f"eval/{setting.name}/{k}": float(v) for k, v in numbers.items()}, step=step)
        if grid is not None:
            # One column per class: labels are balanced (index i has label i mod num_classes).
            nrow = min(trainer.lightning_module.config.num_classes, 10, len(grid))
            path = save_grid(grid, self.out_dir / f"{setting.name}_step{step:07d}.png", nrow=nrow)
            self.grids.append(path)
            if logger is not None and hasattr(logger, "run_id"):
                logger.experiment.log_artifact(logger.run_id, str(path), "samples")


def ensure_classifier(g: DictConfig, data_dir: Path) -> None:
    """Train the dataset's classifier (domain FID) if the evaluation asks for it and it is missing."""
    if g.train_classifier and g.extractor in ("auto", "classifier") and not (data_dir / "classifier.pt").is_file():
        from sgexp.eval.classifier import train_classifier

        log.info("training the %s classifier for domain FID (once, cached with the dataset)", data_dir.name)
        train_classifier(data_dir)


def build_guided_eval(g: DictConfig, run_dir: Path, data_dir: Path) -> GuidedSamplingEval:
    """The evaluation callback, with its feature extractor and reference statistics ready
    (computed now, not after hours of training). ``extractor=auto`` uses the dataset's own
    classifier when it has been trained, and otherwise produces grids and timings only."""
    from sgexp.eval import build_extractor, reference_stats

    ensure_classifier(g, data_dir)
    name = g.extractor
    if name == "auto":
        name = "classifier" if (data_dir / "classifier.pt").is_file() else "none"
        if name == "none":
            log.info(
                "no classifier for %s (python -m sgexp.eval train-classifier %s): grids only", data_dir, data_dir.name
            )
    extractor = reference = None
    if name != "none":
        extractor = build_extractor(name, data_dir)
        if g.reference_batch:  # an ADM reference npz instead of the dataset's own statistics
            from sgexp.eval.reference_batch import load_reference_batch

            reference = load_reference_batch(g.reference_batch, extractor)
        else:
            reference = reference_stats(extractor, data_dir, g.reference_split)
    from sgexp.data import read_meta
    from sgexp.vae import vae_for_dataset

    return GuidedSamplingEval(
        run_dir / "samples",
        OmegaConf.to_container(g.settings, resolve=True),
        extractor=extractor,
        reference=reference,
        num_samples=g.num_samples,
        batch_size=g.batch_size,
        num_steps=g.num_steps,
        seed=g.seed,
        grid_size=g.grid_size,
        every_n_steps=g.every_n_steps,
        decode=vae_for_dataset(read_meta(data_dir), g.vae),  # None unless the dataset holds latents
    )
