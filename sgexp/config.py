"""Typed schemas of the Hydra configs (``configs/``).

The YAML files under ``configs/`` are merged into these dataclasses, so a typo
(``optim.lrr``) or a wrong type (``trainer.max_steps: many``) fails when the
config is composed, naming the key, before anything is built. Experiment files
(``configs/experiment/*.yaml``) are the unit of reproducibility: one file pins
every choice of a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
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


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    t_mean: float = 0.0  # logit-normal timestep distribution
    t_std: float = 1.0
    compile: bool = False


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
    progress: str = "rich"  # rich | none


@dataclass
class LoggerConfig:
    enabled: bool = True
    tracking_uri: str | None = None  # default sqlite:///<root>/runs/mlflow.db, or MLFLOW_TRACKING_URI
    experiment: str = "sgexp"
    run_name: str | None = None


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # kept: step-<N>.ckpt
    last_every_n_steps: int = 100  # last.ckpt, overwritten: what resume uses


@dataclass
class GuidanceSetting:
    """One guidance setting; its name is its key in the ``guidance`` mapping.

    The mappings of settings are typed ``dict[str, Any]`` so that a new setting can
    be added from the command line (``+guidance.sg8={rule: sg, scale: 8, ...}``);
    ``sgexp.lit.eval_callback.make_settings`` validates every setting against these
    fields before any sampling, naming the bad key or value.
    """

    rule: str = "none"  # none | cfg | icg | sg | cfg_sg | ag | ag_sg (sgexp.diffusion.guidance.RULES)
    scale: float = 1.0
    gamma_strong: str = "0"  # a number or "cosine:START:END"
    gamma_weak: str = "0"
    interval: list[float] | None = None  # [t_lo, t_hi]: guide only there
    share_prefix: bool = True  # SG: run the dense prefix before the first routed block once for both branches


def default_settings() -> dict[str, Any]:
    """MNIST defaults (DESIGN.md): CFG is best near w=1.5, SG(0.5, 0.9) near w=5."""
    return {
        "none": {"rule": "none", "scale": 1.0},
        "cfg": {"rule": "cfg", "scale": 1.5},
        "sg": {"rule": "sg", "scale": 5.0, "gamma_strong": "0.5", "gamma_weak": "0.9"},
    }


@dataclass
class GuidedEvalConfig:
    """The evaluation callback: sample grids always, metrics when a feature extractor is available."""

    every_n_steps: int = 0  # 0: only at the end of training
    num_samples: int = 500
    batch_size: int = 250
    num_steps: int = 40
    seed: int = 0
    extractor: str = "auto"  # auto: the dataset's classifier if trained, else none (grids only); or inception
    train_classifier: bool = False  # train the dataset's classifier first if it is missing (~30 s on MNIST-5k)
    reference_split: str = "val"
    reference_batch: str | None = None  # an ADM reference npz (mu, sigma[, arr_0]) instead of the split's statistics
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
    checkpoint: str = "latest"  # a .ckpt, a run directory, an MLflow run id, or "latest"
    weak_checkpoint: str | None = None  # AutoGuidance's weak model
    guidance: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1000
    batch_size: int = 250
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    extractor: str = "auto"  # auto | classifier | mnist | inception
    inception_weights: str | None = None  # or SGEXP_INCEPTION_WEIGHTS
    reference_split: str = "val"
    reference_batch: str | None = None  # an ADM reference npz, e.g. VIRTUAL_imagenet256_labeled.npz
    vae: str | None = None  # latent datasets: load meta.json's VAE from here instead (same weights)
    grid_size: int = 100
    device: str = "auto"
    out_dir: str | None = None  # default: <run dir of the checkpoint>/eval/<timestamp>
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs(store: ConfigStore | None = None) -> None:
    """Register the schemas; ``train.yaml`` and ``evaluate.yaml`` list them first in their defaults."""
    store = store or ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)
