"""Train a TREAD-routed DiT/SiT with flow matching.

    python -m sgexp.train                                  # experiment=mnist_tread (CPU, ~14 min)
    python -m sgexp.train experiment=mnist_dense
    python -m sgexp.train resume=runs/mnist_tread/20261127-101500
    python -m sgexp.train trainer.max_steps=100 logger.tracking_uri=http://127.0.0.1:5000
    python -m sgexp.train experiment=imagenet256_sit_xl2_tread launcher=slurm launcher.nodes=4   # sbatch

``run(cfg)`` does the work and is what tests call through Hydra's compose API.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from sgexp import run_record, runs, slurm, tracking
from sgexp.checks import check_choice, fail
from sgexp.config import OptimConfig, register_configs, use_compile
from sgexp.data import ShardDataModule, ensure_prepared
from sgexp.data.prepare import BUILTIN
from sgexp.lit.callbacks import TrainingMonitor
from sgexp.lit.checkpointing import (
    AtomicCheckpointIO,
    RunConfig,
    checkpoint_callbacks,
    finetune_network,
    load_initial_weights,
)
from sgexp.lit.eval_callback import build_guided_eval, ensure_classifier
from sgexp.lit.mlflow_logger import make_logger
from sgexp.lit.module import FlowMatchingModule
from sgexp.lit.stop import StopOnSignal, TrainingStopped
from sgexp.models.dit import DiTConfig
from sgexp.models.routing import Route

log = logging.getLogger("sgexp.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    global_step: int
    mlflow_run_id: str | None
    tracking_uri: str | None
    sample_grids: list[Path]
    evaluations: list[dict]
    stopped_by: int | None = None  # the signal that stopped training early (its checkpoint is `checkpoint`)


def prepare_data(cfg: DictConfig) -> Path:
    """The dataset's directory; a built-in dataset (mnist5k, digits) is prepared on first use."""
    if cfg.data.prepare and cfg.data.name in BUILTIN:
        ensure_prepared(cfg.data.name, Path(cfg.data.root))
    return Path(cfg.data.root) / cfg.data.name


def model_config(cfg: DictConfig, meta: dict) -> DiTConfig:
    """The network for this dataset: resolution, channels and classes come from meta.json; ``model``'s
    fields besides its name are ``DiTConfig`` fields of the same names."""
    spans = list(cfg.routing.spans)
    routes = "default" if spans == ["default"] else tuple(Route.parse(f"{s}@{cfg.routing.sparsity}") for s in spans)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return DiTConfig.from_name(
        model.pop("name"),
        input_size=int(meta["resolution"]),
        in_channels=int(meta["channels"]),
        num_classes=int(meta["num_classes"]),
        routes=routes,
        train_sparsity=cfg.routing.sparsity,
        **model,
    )


def show_progress_bar(progress: str) -> bool:
    """``trainer.progress``: ``rich`` draws Rich's bar when stdout is a terminal; in a log file (``make train >
    log``, a SLURM job) a bar writes nothing useful, so there, as with ``none``, ``TrainingMonitor`` logs one
    line per ``callbacks.monitor_every_n_steps`` (loss, images/s) on stdout, and each evaluation pass its own
    lines (``sgexp.progress``)."""
    check_choice("trainer.progress", progress, ("rich", "none"))
    return progress == "rich" and sys.stdout.isatty()


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks: list[L.Callback]) -> L.Trainer:
    t = cfg.trainer
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and t.accelerator != "cpu" else "32-true"
    progress = show_progress_bar(t.progress)
    if progress:
        callbacks = [*callbacks, L.pytorch.callbacks.RichProgressBar(refresh_rate=5)]
    in_slurm = SLURMEnvironment.detect()
    # Stop on a signal before anything else of the step runs (evaluation, periodic checkpoints): sgexp.lit.stop.
    callbacks = [StopOnSignal(run_dir, slurm=in_slurm), *callbacks]
    plugins = [AtomicCheckpointIO()]
    if in_slurm:  # sgexp requeues on SIGUSR1 in step on all ranks (sgexp.lit.stop), not Lightning's way
        plugins.append(SLURMEnvironment(auto_requeue=False))
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
        plugins=plugins,
    )


def run(cfg: DictConfig) -> TrainResult:
    """Train as ``cfg`` says; returns where everything went.

    Global rank zero holds the run directory's lock (``sgexp.runs.RunLock``) from before it looks for a
    checkpoint until training has ended, so a second training on the same directory fails at once.
    """
    root = Path(cfg.paths.root).resolve()
    cfg.paths.root = str(root)
    show_progress_bar(cfg.trainer.progress)  # a misspelt choice fails now, not after the data is prepared
    if cfg.init_from and cfg.resume:
        raise fail("init_from", cfg.init_from, "starts a new run; resume= continues one: give one of them")
    if cfg.init_from:  # a checkpoint file, or a run directory: its newest checkpoint
        source = Path(cfg.init_from).expanduser().resolve()
        newest = runs.newest_checkpoint(source) if source.is_dir() else None
        if not source.is_file() and newest is None:
            raise fail("init_from", cfg.init_from, "no checkpoint file, nor a run directory with a checkpoint")
        cfg.init_from = str(newest.path if newest else source)
    run_dir, named_ckpt = runs.resolve_paths(cfg)

    # Cheap checks first: a bad tracking URI, optimizer setting or dataset fails before any training.
    tracking_uri = tracking.tracking_uri_for(cfg.logger, root)
    optim: OptimConfig = OmegaConf.to_object(cfg.optim)  # checked in OptimConfig.__post_init__
    use_compile(
        cfg.trainer.compile, cfg.trainer.compile_mode, "cpu"
    )  # a bad trainer.compile fails before the data is prepared
    data = OmegaConf.to_object(cfg.data)
    datamodule = ShardDataModule(
        str(prepare_data(cfg)), **data.loader_args(), seed=cfg.seed, max_steps=cfg.trainer.max_steps
    )
    network = model_config(cfg, datamodule.meta)
    if cfg.init_from:
        network = finetune_network(network, cfg.init_from)
    config = OmegaConf.to_container(cfg, resolve=True)
    lock = runs.RunLock(run_dir) if runs.launched_as_rank_zero() else contextlib.nullcontext()
    with lock:
        if isinstance(lock, runs.RunLock):
            for path in runs.remove_partial_saves(run_dir):
                log.warning("removed %s, left by a checkpoint save that was killed", path)
        start = runs.continue_from(run_dir, named_ckpt, cfg.resume, config, network)
        return _train(cfg, run_dir, start, datamodule, network, optim, config, tracking_uri)


def _train(cfg, run_dir, start, datamodule, network, optim, config, tracking_uri) -> TrainResult:
    root, data_dir, ckpt_dir = Path(cfg.paths.root), Path(cfg.data.root) / cfg.data.name, run_dir / "checkpoints"
    L.seed_everything(cfg.seed, workers=True)
    module = FlowMatchingModule(
        network.to_dict(),
        optim,
        seed=cfg.seed,
        dataset=cfg.data.name,
        compile=cfg.trainer.compile,
        compile_mode=cfg.trainer.compile_mode,
    )

    tags = {}
    if cfg.init_from and start is None:  # a fine-tuning run's first start; later starts resume it
        load_initial_weights(module, cfg.init_from, cfg.init_from_weights)
        tags = {"sgexp.init_from": cfg.init_from, "sgexp.init_from_weights": cfg.init_from_weights}

    run_dir.mkdir(parents=True, exist_ok=True)
    logger = None
    if cfg.logger.enabled:
        run_name = cfg.logger.run_name or f"{cfg.experiment}/{run_dir.name}"
        logger = make_logger(
            run_dir, tracking_uri, cfg.logger.experiment, run_name, tags=tags, system_metrics=cfg.logger.system_metrics
        )
        run_record.log_run_context(
            logger, logger.run_id, config=config, meta=datamodule.meta, checkpoint_dir=ckpt_dir, root=root
        )

    c = cfg.callbacks
    guided_eval = build_guided_eval(c.guided_eval, run_dir, data_dir)
    callbacks = [
        RunConfig(config, run_dir),
        *checkpoint_callbacks(c.checkpoint, ckpt_dir),
        TrainingMonitor(c.monitor_every_n_steps),
        guided_eval,
    ]
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    if cfg.data.global_batch_size:  # the recipe's batch on any number of devices
        total, world = cfg.data.global_batch_size, trainer.world_size
        per_device = datamodule.set_global_batch_size(total, world, trainer.accumulate_grad_batches)
        log.info("global batch %d: %d per device x %d devices", total, per_device, world)
    environment = type(getattr(trainer.strategy, "cluster_environment", None)).__name__
    log.info(
        "cluster environment: %s, world size %d, global rank %d", environment, trainer.world_size, trainer.global_rank
    )
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    if logger is not None and trainer.is_global_zero:
        tags = {"cluster_environment": environment, "world_size": trainer.world_size}
        if restarts is not None:
            tags["slurm_restart_count"] = restarts
        for key, value in tags.items():
            logger.experiment.set_tag(logger.run_id, f"sgexp.{key}", str(value))
    resuming = f" (resuming from {start.path.name}, step {start.global_step})" if start else ""
    log.info("run directory: %s%s", run_dir, resuming)
    stopped = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(start.path) if start else None)
    except TrainingStopped as stop:
        stopped = stop
        if trainer.is_global_zero:
            log.warning("%s", stop)
        if logger is not None and trainer.is_global_zero:  # Lightning marked it FAILED; it was stopped
            logger.experiment.set_terminated(logger.run_id, "KILLED")
    finally:
        for callback in trainer.callbacks:
            if isinstance(callback, StopOnSignal):
                callback.restore()

    result = TrainResult(
        run_dir=run_dir,
        checkpoint=stopped.checkpoint if stopped else ckpt_dir / "last.ckpt",
        global_step=trainer.global_step,
        mlflow_run_id=logger.run_id if logger is not None else None,
        tracking_uri=tracking_uri,
        sample_grids=list(guided_eval.grids),
        evaluations=list(guided_eval.rows),
        stopped_by=stopped.signum if stopped else None,
    )
    if trainer.is_global_zero and not stopped:
        _print_summary(result)
    return result


def submit(cfg: DictConfig, overrides: list[str]) -> None:
    """``launcher=slurm``: ``sgexp.slurm.submit_training`` writes and submits the batch job. The dataset and
    the classifier of the in-training evaluation are prepared once here, on the login node, not by every
    rank of the job."""

    def prepare() -> None:
        if cfg.data.prepare and cfg.data.name in BUILTIN:
            ensure_classifier(cfg.callbacks.guided_eval, prepare_data(cfg))

    job_id, run_dir = slurm.submit_training(cfg, overrides, prepare)
    print(f"submitted SLURM job {job_id}: run directory {run_dir}")
    print(f"  follow: tail -f {run_dir / 'slurm' / (job_id + '.out')}    queue: squeue -j {job_id}")


def _print_summary(result: TrainResult) -> None:
    console = Console(soft_wrap=True)  # in a log file, paths stay on their line (no wrapping at 80 columns)
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
    # Resuming into the run directory is the point (sgexp.runs), not something to warn about.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
    def _main(cfg: DictConfig) -> None:
        check_choice("launcher.name", cfg.launcher.name, ("local", "slurm"))
        if cfg.launcher.name == "slurm" and not cfg.launcher.submitted:
            submit(cfg, list(HydraConfig.get().overrides.task))
            return
        try:
            result = run(cfg)
        finally:
            # An explicit teardown: gloo processes that exit with the group alive abort now and then.
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        if result.stopped_by in (signal.SIGINT, signal.SIGTERM):  # stopped early: say so to the shell
            sys.exit(128 + result.stopped_by)

    _main()


if __name__ == "__main__":
    main()
