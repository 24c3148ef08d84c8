"""Typed schemas of the Hydra configs (``configs/``).

The YAML files under ``configs/`` are merged into these dataclasses, so a typo
(``optim.lrr``) or a wrong type (``trainer.max_steps: many``) fails when the
config is composed, naming the key, before anything is built. Experiment files
(``configs/experiment/*.yaml``) are the unit of reproducibility: one file pins
every choice of a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore

from sgexp.checks import fail


@dataclass
class ModelConfig:
    """The network: a registry size; every other field is the ``DiTConfig`` field of the same name."""

    name: str = "SiT-Tiny/4"  # registry name, see sgexp.models.dit.MODEL_SIZES
    class_dropout_prob: float = 0.1  # label dropout (CFG training); null label = num_classes
    mlp_ratio: float = 4.0


@dataclass
class RoutingConfig:
    # "default": the size's TREAD route; "start:end" (inclusive) otherwise; [] trains dense.
    spans: list[str] = field(default_factory=lambda: ["default"])
    sparsity: float = 0.5  # γ_train: fraction of tokens that skip each route


@dataclass
class DataConfig:
    name: str = "mnist5k"  # a prepared dataset under root (meta.json)
    root: str = "${paths.data_dir}"
    batch_size: int = 128  # per device
    global_batch_size: int | None = None  # if set: per device = global / (devices x nodes x accumulation)
    val_batch_size: int | None = None
    num_workers: int = 1
    hflip: bool = False
    strict: bool = False  # fail on a corrupted shard instead of skipping bad samples
    shuffle_shards: int = 4  # shards shuffled together (one window held per loader worker); part of the stream
    prepare: bool = True  # prepare embedded datasets (mnist5k, digits) when missing

    def loader_args(self) -> dict[str, Any]:
        """The arguments of ``sgexp.data.ShardDataModule``, which share these fields' names; the others say
        which data (name, root), how to share a global batch (applied once the trainer is known) and whether
        to prepare it."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "root", "global_batch_size", "prepare")}


@dataclass
class OptimConfig:
    """How the network is optimised: AdamW, the learning rate ramped linearly over ``warmup_steps`` and then
    constant (the SG paper uses no schedule), gradient clipping, the EMA of the weights, the timestep
    distribution of the loss. The one home of these settings: a new optimizer option is a field here, its
    check in ``__post_init__`` and its use in ``make_optimizer``. ``sgexp.lit.module.FlowMatchingModule``
    takes this object and stores it in checkpoints as a plain dict (``asdict``)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # the learning rate ramps linearly from lr / warmup_steps to lr
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n (sgexp.lit.ema)
    t_mean: float = 0.0  # logit-normal timestep distribution
    t_std: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise fail("optim.lr", self.lr, "must be a number > 0")
        betas = list(self.betas)  # a tuple, a list or OmegaConf's ListConfig; stored as a list of floats
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
            raise fail("optim.betas", self.betas, "must be two numbers in [0, 1)")
        self.betas = [float(b) for b in betas]
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise fail("optim.warmup_steps", self.warmup_steps, "must be an integer >= 0")
        if not self.grad_clip >= 0:
            raise fail("optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise fail("optim.ema_decay", self.ema_decay, "must be in [0, 1)")

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> dict[str, Any]:
        """AdamW over ``params`` and its per-step schedule, as Lightning's ``configure_optimizers`` returns them.

        On CUDA the fused kernel (one launch for all tensors) unless gradients are clipped: Lightning's
        mixed-precision plugin refuses to clip for an optimizer that unscales internally, as fused ones do."""
        params = list(params)
        fused = self.grad_clip == 0 and bool(params) and all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(
            params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay, fused=fused or None
        )
        warmup = max(self.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    max_steps: int = 1000
    max_time: str | None = None  # wall-clock limit "DD:HH:MM:SS"; step times drift on shared machines
    log_every_n_steps: int = 50
    val_every_n_steps: int = 500
    limit_val_batches: float = 1.0
    accumulate_grad_batches: int = 1
    # rich: Rich's bar on a terminal, else a line per callbacks.monitor_every_n_steps | none: the lines only
    progress: str = "rich"
    # torch.compile of the network's tensor computation (sgexp.models.compiled; the random draws stay eager):
    # null/"auto": on for CUDA, off for CPU; true/false force it. compile_mode: default | reduce-overhead (CUDA
    # graphs) | max-autotune | max-autotune-no-cudagraphs (torch.compile's modes)
    compile: Any = None
    compile_mode: str = "default"


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def use_compile(compile: Any, mode: str, device_type: str, key: str = "trainer.compile") -> bool:
    """``trainer.compile`` (or ``key``: evaluation's ``compile``) resolved for the device the network runs on
    (``"cuda"``, ``"cpu"``, ...); a bad ``compile`` or ``compile_mode`` fails naming the key."""
    if not (compile is None or isinstance(compile, bool) or compile == "auto"):
        raise fail(key, compile, "must be null, 'auto' (on for CUDA, off for CPU), true or false")
    if mode not in COMPILE_MODES:
        raise fail(f"{key}_mode", mode, f"must be one of {list(COMPILE_MODES)}")
    return device_type == "cuda" if compile in (None, "auto") else compile


@dataclass
class LoggerConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # default sqlite:///<root>/runs/mlflow.db, or MLFLOW_TRACKING_URI
    experiment: str = "sgexp"
    run_name: str | None = None
    system_metrics: bool = True  # CPU/GPU utilisation and memory in the training run (MLflow system metrics)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # kept: step-<N>.ckpt
    last_every_n_steps: int = 100  # last.ckpt, overwritten: what resume uses


@dataclass
class GuidanceSetting:
    """One guidance setting; its name is its key in the ``guidance`` mapping.

    The mappings of settings are typed ``dict[str, Any]`` so that a new setting can
    be added from the command line (``+guidance.sg8={rule: sg, scale: 8, ...}``);
    ``sgexp.eval.settings.make_settings`` validates every setting against these
    fields before any sampling, naming the bad key or value.
    """

    rule: str = "none"  # none | cfg | icg | sg | cfg_sg | ag | ag_sg (sgexp.diffusion.guidance.RULES)
    scale: float = 1.0
    # γ: a number in [0, 1) or "cosine:START:END", unquoted in YAML and on the command line (Any: OmegaConf has
    # no number-or-string type; make_settings checks the value and names the key)
    gamma_strong: Any = 0.0
    gamma_weak: Any = 0.0
    interval: list[float] | None = None  # [t_lo, t_hi]: guide only there
    share_prefix: bool = True  # SG: run the dense prefix before the first routed block once for both branches


def default_settings() -> dict[str, Any]:
    """MNIST defaults (DESIGN.md): CFG is best near w=1.5, SG(0.5, 0.9) near w=5."""
    return {
        "none": {"rule": "none", "scale": 1.0},
        "cfg": {"rule": "cfg", "scale": 1.5},
        "sg": {"rule": "sg", "scale": 5.0, "gamma_strong": 0.5, "gamma_weak": 0.9},
    }


@dataclass
class GuidedEvalConfig:
    """The evaluation callback (``sgexp.lit.eval_callback``): EMA samples for each setting at the end of
    training (and every ``every_n_steps`` if > 0); sample grids always, metrics when an extractor is chosen."""

    every_n_steps: int = 0  # 0: only at the end of training
    num_samples: int = 500
    batch_size: int = 250
    num_steps: int = 40  # Euler steps
    seed: int = 0
    extractor: str = "auto"  # auto: the dataset's classifier if trained, else none (grids only); or inception(_tf)
    train_classifier: bool = False  # train the dataset's classifier first if it is missing (~30 s on MNIST-5k)
    reference_split: str = "val"
    reference_batch: str | None = None  # an ADM reference npz (mu, sigma, mu_s, sigma_s, arr_0; extractor inception_tf)
    vae: str | None = None  # latent datasets: load meta.json's VAE from here instead (same weights)
    grid_size: int = 100
    settings: dict[str, Any] = field(default_factory=default_settings)


@dataclass
class CallbacksConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guided_eval: GuidedEvalConfig = field(default_factory=GuidedEvalConfig)
    monitor_every_n_steps: int = 50


@dataclass
class PathsConfig:
    root: str = "."  # the repository (resolved to an absolute path at start)
    data_dir: str = "${paths.root}/data/shards"
    runs_dir: str = "${paths.root}/runs"
    run_dir: str | None = None  # default: <runs_dir>/<experiment>/<timestamp>


@dataclass
class LauncherConfig:
    """Where ``sgexp.train`` runs: in this process (``local``) or as a SLURM batch job (``slurm``, see
    ``sgexp.slurm``): the submitting process checks the config, fixes the run directory and writes
    ``<run_dir>/slurm/train.sbatch``; the job runs nodes × tasks_per_node copies of training under srun."""

    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 0  # = tasks per node (one per GPU); 0: CPU tasks, tasks_per_node of them
    tasks_per_node: int = 1
    cpus_per_task: int = 8
    mem: str | None = None  # per node, e.g. "256G"
    time: str | None = None  # e.g. "2-00:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_seconds: int | None = 300  # SIGUSR1 this long before the time limit: checkpoint, requeue, resume
    extra: list[str] = field(default_factory=list)  # more sbatch options, e.g. "--constraint=h100"
    setup: list[str] = field(default_factory=list)  # shell lines before srun, e.g. "module load cuda"
    submitted: bool = False  # set on the job's own command line: run training, do not submit again


@dataclass
class TrainConfig:
    experiment: str = "mnist_tread"
    seed: int = 0
    resume: str | None = None  # continue a run: its directory or a checkpoint in it (sgexp.runs)
    init_from: str | None = None  # start a new run from another checkpoint's weights (fine-tuning)
    init_from_weights: str = "ema"  # ema | model: which weights of init_from
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass
class SamplerConfig:
    solver: str = "euler"  # euler | heun
    steps: int = 40


@dataclass
class EvaluateConfig:
    """``python -m sgexp.evaluate`` (``configs/evaluate.yaml`` adds the guidance selection and paths)."""

    checkpoint: str = "latest"  # a .ckpt, a run directory, an MLflow run id, or "latest" (newest under runs_dir)
    weak_checkpoint: str | None = None  # AutoGuidance's weak model (ag, ag_sg)
    guidance: dict[str, Any] = field(default_factory=dict)  # name -> GuidanceSetting; configs/guidance/*.yaml
    num_samples: int = 1000
    batch_size: int = 250  # per process
    seed: int = 0  # every setting is scored on the same sample indices (same noise and labels)
    labels: str = "balanced"  # balanced: i mod C; uniform: drawn per index, as DiT's sample_ddp.py (ImageNet protocols)
    save_npz: bool = False  # also write <out_dir>/<setting>.npz (arr_0 uint8 NHWC, labels) for ADM's evaluator
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # auto: the dataset's classifier if trained (domain FID), else inception; or classifier, inception (clean-fid's
    # clean resize) or inception_tf (ADM's evaluator pipeline: FID, sFID, IS; protocol=adm)
    extractor: str = "auto"
    inception_weights: str | None = None  # or SGEXP_INCEPTION_WEIGHTS
    reference_split: str = "val"
    reference_batch: str | None = None  # ADM's npz, e.g. VIRTUAL_imagenet256_labeled.npz; needs extractor=inception_tf
    vae: str | None = None  # latent datasets: load meta.json's VAE from here instead (same weights)
    grid_size: int = 100
    bootstrap: int = 1000  # redraws of the sample indices for fid_ci and the paired intervals; 0: none
    ci_level: float = 0.95  # confidence level of those intervals
    # select=best_w (sgexp.eval.selection): for each setting with a scale (not none), score every w of w_grid on
    # select_samples samples (the same indices for every w), keep the lowest FID, then score that w on num_samples;
    # results.json says which w was picked from what grid and how decisive the pick was (paired intervals).
    select: str = "none"  # none | best_w
    w_grid: list[float] = field(default_factory=lambda: [1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])  # each >= 1
    select_samples: int = 1000  # may exceed num_samples (unusual, allowed)
    select_seed: int | None = None  # None: seed + 1, samples the final scores never reuse (no bias from the pick)
    device: str = "auto"
    # torch.compile of the loaded networks for sampling, as trainer.compile: auto = on for CUDA, off for CPU
    compile: Any = "auto"
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune | ... (COMPILE_MODES)
    out_dir: str | None = None  # default: <run dir of the checkpoint>/eval/<timestamp>
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs(store: ConfigStore | None = None) -> None:
    """Register the schemas; ``train.yaml`` and ``evaluate.yaml`` list them first in their defaults."""
    store = store or ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
