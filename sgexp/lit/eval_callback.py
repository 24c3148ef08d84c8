"""``GuidedSamplingEval``: score the EMA model under several guidance settings during training;
``build_guided_eval`` makes it from the ``callbacks.guided_eval`` config (``sgexp.config.GuidedEvalConfig``)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from sgexp.checks import check_positive_int
from sgexp.config import GuidedEvalConfig
from sgexp.diffusion.sampler import Sampler
from sgexp.eval.classifier import CHECKPOINT, train_classifier
from sgexp.eval.features import ALIASES
from sgexp.eval.sampling import Setting, save_grid, score_setting
from sgexp.eval.scoring import Scoring, classifier_dataset, load_scoring
from sgexp.eval.settings import make_settings
from sgexp.run_record import eval_key, eval_metrics, log_image

log = logging.getLogger(__name__)
CONFIG_KEY = "callbacks.guided_eval"


class GuidedSamplingEval(L.Callback):
    """Every ``every_n_steps`` (if > 0) and at the end of training, for each setting:
    ``num_samples`` EMA samples on the same indices, metrics prefixed by the setting's
    name (``eval/sg/fid``, ``eval/sg/gflops_per_sample``, ...; ``sgexp.run_record.eval_metrics``) and a
    sample grid in ``<run_dir>/samples``, logged as the MLflow image ``eval/sg/samples`` at the step.

    ``scoring`` holds the feature extractor with its reference statistics (None, or an
    extractor of None: grids and timing only, e.g. before the dataset's classifier is
    trained) and the decoder of a latent model's samples (moved to the model's device).
    Sampling is spread over all ranks; rank 0 logs.
    """

    def __init__(self, cfg: GuidedEvalConfig | DictConfig, run_dir: str | Path, scoring: Scoring | None = None):
        settings = cfg.settings
        if isinstance(settings, DictConfig):
            settings = OmegaConf.to_container(settings, resolve=True)
        self.settings = make_settings(settings, prefix=f"{CONFIG_KEY}.settings")
        self.num_samples = check_positive_int(f"{CONFIG_KEY}.num_samples", cfg.num_samples)
        self.batch_size = check_positive_int(f"{CONFIG_KEY}.batch_size", cfg.batch_size)
        self.seed, self.grid_size, self.every_n_steps = cfg.seed, cfg.grid_size, cfg.every_n_steps
        self.sampler = Sampler("euler", cfg.num_steps)
        self.out_dir = Path(run_dir) / "samples"
        self.scoring = scoring or Scoring(None, None, "", None)
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
        extractor, decode = self.scoring.extractor, self.scoring.decode
        if extractor is not None:
            extractor.to(pl_module.device)
        if decode is not None:
            decode.to(pl_module.device)
        models, configs = {"main": pl_module.ema.model}, {"main": pl_module.config}
        rows = []
        for setting in self.settings:
            row, scored = score_setting(
                setting,
                models,
                configs,
                self.sampler,
                extractor,
                self.scoring.reference,
                self.num_samples,
                self.seed,
                self.batch_size,
                pl_module.device,
                decode,
                grid_size=self.grid_size,
            )
            row["step"] = step
            rows.append(row)
            if trainer.is_global_zero:
                self._report(trainer, setting, row, scored.grid, step)
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
        if logger is not None:  # the vocabulary of sgexp.evaluate and sweep trials (sgexp.run_record)
            logger.log_metrics(eval_metrics(setting.name, numbers), step=step)
        if grid is not None:
            # One column per class: labels are balanced (index i has label i mod num_classes).
            nrow = min(trainer.lightning_module.config.num_classes, 10, len(grid))
            path = save_grid(grid, self.out_dir / f"{setting.name}_step{step:07d}.png", nrow=nrow)
            self.grids.append(path)
            if isinstance(logger, MLFlowLogger):  # an MLflow image with its step; the PNG stays in samples/
                log_image(logger, path, eval_key(setting.name, "samples"), step=step)


def ensure_classifier(g: GuidedEvalConfig | DictConfig, data_dir: Path) -> None:
    """Train the dataset's classifier (domain FID) if the evaluation asks for it and it is missing."""
    if not g.train_classifier or ALIASES.get(g.extractor, g.extractor) not in ("auto", "classifier"):
        return
    images = classifier_dataset(data_dir)  # for latents: the image dataset they were encoded from
    if images is not None and not (images / CHECKPOINT).is_file():
        log.info("training the %s classifier for domain FID (once, cached with the dataset)", images.name)
        train_classifier(images)


def build_guided_eval(g: GuidedEvalConfig | DictConfig, run_dir: Path, data_dir: Path) -> GuidedSamplingEval:
    """The evaluation callback, with its feature extractor and reference statistics ready
    (computed now, not after hours of training). ``extractor=auto`` uses the dataset's own
    classifier when it has been trained, and otherwise produces grids and timings only."""
    ensure_classifier(g, data_dir)
    scoring = load_scoring(
        g.extractor, data_dir, g.reference_split, g.reference_batch, vae=g.vae, without_classifier="none"
    )
    return GuidedSamplingEval(g, run_dir, scoring)
