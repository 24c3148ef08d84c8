"""Train a TREAD-routed DiT/SiT with flow matching.

    python -m sgexp.train                                  # experiment=mnist_tread (CPU, ~14 min)
    python -m sgexp.train experiment=mnist_dense
    python -m sgexp.train resume=runs/mnist_tread/20261127-101500
    python -m sgexp.train trainer.max_steps=100 logger.tracking_uri=http://127.0.0.1:5000

``run(cfg)`` does the work and is what tests call through Hydra's compose API.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from sgexp import run_record, tracking
from sgexp.config import register_configs
from sgexp.data import ShardDataModule, ensure_prepared
from sgexp.lit.callbacks import FinalCheckpoint, TrainingMonitor
from sgexp.lit.eval_callback import GuidedSamplingEval
from sgexp.lit.module import FlowMatchingModule
from sgexp.models.dit import DiTConfig
from sgexp.models.routing import Route

log = logging.getLogger("sgexp.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
EMBEDDED_DATASETS = ("mnist5k", "digits")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    global_step: int
    mlflow_run_id: str | None
    tracking_uri: str | None
    sample_grids: list[Path]
    evaluations: list[dict]


def resolve_paths(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from).

    ``resume`` may name a checkpoint or a run directory; a resumed run keeps
    writing into its own run directory, so it finds its checkpoints and its
    MLflow run again. New runs get ``<runs_dir>/<experiment>/<timestamp>``
    unless ``paths.run_dir`` is given.
    """
    ckpt = None
    if cfg.resume:
        target = Path(cfg.resume).expanduser().resolve()
        if target.is_dir():
            ckpt = target / "checkpoints" / "last.ckpt"
            run_dir = target
        else:
            ckpt = target
            run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        if not ckpt.is_file():
            raise ValueError(f"resume={cfg.resume!r} is invalid: no checkpoint at {ckpt}")
        if cfg.paths.run_dir and Path(cfg.paths.run_dir).resolve() != run_dir:
            raise ValueError(f"paths.run_dir={cfg.paths.run_dir!r} is invalid: resume uses the run directory {run_dir}")
    elif cfg.paths.run_dir:
        run_dir = Path(cfg.paths.run_dir).resolve()
    else:
        run_dir = Path(cfg.paths.runs_dir).resolve() / cfg.experiment / datetime.now().strftime("%Y%m%d-%H%M%S")
    return run_dir, ckpt


def model_config(cfg: DictConfig, meta: dict) -> DiTConfig:
    """The network for this dataset: resolution, channels and classes come from meta.json."""
    spans = list(cfg.routing.spans)
    routes = "default" if spans == ["default"] else tuple(Route.parse(f"{s}@{cfg.routing.sparsity}") for s in spans)
    return DiTConfig.from_name(
        cfg.model.name,
        input_size=int(meta["resolution"]),
        in_channels=int(meta["channels"]),
        num_classes=int(meta["num_classes"]),
        routes=routes,
        train_sparsity=cfg.routing.sparsity,
        class_dropout_prob=cfg.model.class_dropout_prob,
        mlp_ratio=cfg.model.mlp_ratio,
    )


def build_guided_eval(g: DictConfig, run_dir: Path, data_dir: Path) -> GuidedSamplingEval:
    """The evaluation callback, with its feature extractor and reference statistics ready
    (computed now, not after hours of training). ``extractor=auto`` uses the dataset's own
    classifier when it has been trained, and otherwise produces grids and timings only."""
    from sgexp.eval import build_extractor, reference_stats

    if g.train_classifier and g.extractor in ("auto", "classifier") and not (data_dir / "classifier.pt").is_file():
        from sgexp.eval.classifier import train_classifier

        log.info("training the %s classifier for domain FID (once, cached with the dataset)", data_dir.name)
        train_classifier(data_dir)
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
        reference = reference_stats(extractor, data_dir, g.reference_split)
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
    )


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks: list[L.Callback]) -> L.Trainer:
    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and t.accelerator != "cpu" else "32-true"
    progress = t.progress == "rich"
    if progress:
        callbacks = [*callbacks, L.pytorch.callbacks.RichProgressBar(refresh_rate=5)]
    return L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_time=t.max_time,
        max_epochs=-1,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
    )


def run(cfg: DictConfig) -> TrainResult:
    """Train as ``cfg`` says; returns where everything went."""
    root = Path(cfg.paths.root).resolve()
    cfg.paths.root = str(root)
    run_dir, resume_ckpt = resolve_paths(cfg)
    ckpt_dir = run_dir / "checkpoints"

    # Cheap checks first: a bad tracking URI or dataset fails before any training.
    tracking_uri = None
    if cfg.logger.enabled:
        tracking_uri = tracking.resolve_tracking_uri(cfg.logger.tracking_uri, root)
        tracking.check_tracking_uri(tracking_uri)
    data_dir = Path(cfg.data.root) / cfg.data.name
    if cfg.data.prepare and cfg.data.name in EMBEDDED_DATASETS:
        ensure_prepared(cfg.data.name, Path(cfg.data.root))
    datamodule = ShardDataModule(
        str(data_dir),
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        val_batch_size=cfg.data.val_batch_size,
        hflip=cfg.data.hflip,
        strict=cfg.data.strict,
        seed=cfg.seed,
        max_steps=cfg.trainer.max_steps,
    )
    L.seed_everything(cfg.seed, workers=True)
    network = model_config(cfg, datamodule.meta)
    o = cfg.optim
    module = FlowMatchingModule(
        network.to_dict(),
        lr=o.lr,
        betas=tuple(o.betas),
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        ema_decay=o.ema_decay,
        ema_warmup=o.ema_warmup,
        t_mean=o.t_mean,
        t_std=o.t_std,
        compile=o.compile,
        seed=cfg.seed,
        dataset=cfg.data.name,
    )

    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    logger = None
    if cfg.logger.enabled:
        run_name = cfg.logger.run_name or f"{cfg.experiment}/{run_dir.name}"
        logger = tracking.make_logger(run_dir, tracking_uri, cfg.logger.experiment, run_name)
        run_record.log_run_context(
            logger,
            logger.run_id,
            config=OmegaConf.to_container(cfg, resolve=True),
            meta=datamodule.meta,
            checkpoint_dir=ckpt_dir,
            root=root,
        )

    c = cfg.callbacks
    guided_eval = build_guided_eval(c.guided_eval, run_dir, data_dir)
    checkpoints = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=c.checkpoint.every_n_steps,
            save_top_k=-1,
            save_last=False,
        ),
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            every_n_train_steps=c.checkpoint.last_every_n_steps,
            save_top_k=1,
            enable_version_counter=False,
        ),
        FinalCheckpoint(ckpt_dir),
    ]
    callbacks = [*checkpoints, TrainingMonitor(c.monitor_every_n_steps), guided_eval]
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    log.info("run directory: %s", run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_ckpt) if resume_ckpt else None)

    result = TrainResult(
        run_dir=run_dir,
        checkpoint=ckpt_dir / "last.ckpt",
        global_step=trainer.global_step,
        mlflow_run_id=logger.run_id if logger is not None else None,
        tracking_uri=tracking_uri,
        sample_grids=list(guided_eval.grids),
        evaluations=list(guided_eval.rows),
    )
    if trainer.is_global_zero:
        _print_summary(result)
    return result


def _print_summary(result: TrainResult) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]finished[/] at step {result.global_step}")
    console.print(f"  checkpoint   {result.checkpoint}")
    for grid in result.sample_grids[-3:]:
        console.print(f"  samples      {grid}")
    if result.mlflow_run_id:
        console.print(f"  mlflow run   {result.mlflow_run_id} in {result.tracking_uri}  (make ui)")


def main() -> None:
    register_configs()
    warnings.filterwarnings("ignore", message=".*srun.*")  # on SLURM login nodes Lightning warns about srun
    # The EMA copy is in eval mode on purpose (no label dropout, dense by default).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
