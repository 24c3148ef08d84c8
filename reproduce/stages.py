"""Presets of the reproduction and the plain list of stages they expand to.

A preset fixes every number a result depends on (training steps, sample counts, seeds, guidance
settings, the sparsity grid) before anything runs; ``build_plan`` turns it into ``Stage`` records,
each one command of the project's own entry points with its dependencies and the file it leaves
behind. The guidance settings are chosen from DESIGN.md's prototype (CFG best near w=1.5, SG near
w=5-8) and the paper's defaults, not from this run's results.

Paths in the commands are relative to the repository when they lie inside it: the stages run there,
and the commands are what docs/results.md prints.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sgexp.checks import fail
from sgexp.eval import stats_path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("tread", "dense")  # the two trainings; experiment mnist_<model>
STUDY = "sparsity_pareto"  # the sweep: sweeps/sparsity_pareto.yaml


def rel(path: Path | str) -> str:
    """``path`` as commands and docs write it: relative to the repository when inside it (made
    absolute without resolving links, so that .venv/bin/python stays .venv/bin/python)."""
    path = Path(os.path.abspath(path))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def interpreter() -> str:
    """The Python running the pipeline as commands show it: .venv/bin/python, never a machine path."""
    python = rel(sys.executable)
    return "python" if Path(python).is_absolute() else python


def _sg(scale: float, strong: float, weak: float, rule: str = "sg") -> dict:
    return {"rule": rule, "scale": scale, "gamma_strong": strong, "gamma_weak": weak}


# The guidance table on the TREAD model, one evaluation stage per group (all on the same sample seeds).
# none_sparse is ω=1 at test-time sparsity 0.5: the paper says unguided quality degrades with γ.
GUIDANCE: dict[str, dict[str, dict]] = {
    "base": {"none": {"rule": "none", "scale": 1.0}, "none_sparse": {"rule": "none", "gamma_strong": 0.5}},
    "cfg": {"cfg_w1p5": {"rule": "cfg", "scale": 1.5}, "cfg_w3": {"rule": "cfg", "scale": 3.0}},
    "sg": {"sg_w3": _sg(3.0, 0.5, 0.9), "sg_w5": _sg(5.0, 0.5, 0.9), "sg_w8": _sg(8.0, 0.5, 0.9)},
    "cfg_sg": {"cfg_sg_w1p5": _sg(1.5, 0.0, 0.5, "cfg_sg"), "cfg_sg_w3": _sg(3.0, 0.0, 0.5, "cfg_sg")},
}


@dataclass(frozen=True)
class Preset:
    """Everything the pipeline's numbers depend on; see ``PRESETS``."""

    name: str
    dataset: str
    steps: int  # training steps of each model: the same for TREAD and dense, no wall-clock limit
    checkpoint_every: int  # kept checkpoints, each scored for the TREAD-vs-dense curve
    table_samples: int  # each setting of the guidance table
    curve_samples: int  # each point of the TREAD-vs-dense curve (the last points are the final comparison)
    heatmap_samples: int
    heatmap_scales: tuple[float, ...]  # one (γ_s, γ_w) FID heatmap per w
    heatmap_gammas: tuple[float, ...]  # grid values of both γ; cells with γ_s >= γ_w are not SG
    sweep_trials: int  # sparsity_pareto budget, its 6 baselines included
    sweep_samples: int
    sweep_final_samples: int
    sampler_steps: int = 40  # Euler steps, as in the paper
    eval_batch_size: int = 250
    grid_size: int = 100
    seed: int = 0  # training seed and sample seeds (every evaluation uses the same indices)
    classifier_epochs: int = 12  # the domain-FID classifier, trained once if the dataset has none
    train_overrides: tuple[str, ...] = ()  # Hydra overrides on top of experiment=mnist_<model>
    guidance: dict[str, dict[str, dict]] = field(default_factory=lambda: GUIDANCE)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    # Sized for about an hour on 2 quiet cores from one-thread measurements on this machine (~0.45-0.65 s
    # per routed training step at batch 64, ~0.15-0.25 s per sample and dense pass with 40 Euler steps):
    # two 3,000-step trainings side by side, then ~1.2 core-hours of sampling on both cores. Much longer
    # when other jobs share the cores; the numbers do not change. `make train` stops at 11 minutes
    # (~2,000 steps); this trains both models to 3,000 steps.
    "full": Preset(
        name="full",
        dataset="mnist5k",
        steps=3000,
        checkpoint_every=1000,
        table_samples=500,
        curve_samples=500,
        heatmap_samples=300,
        heatmap_scales=(3.0, 6.0),
        heatmap_gammas=(0.0, 0.25, 0.5, 0.75),
        sweep_trials=12,
        sweep_samples=200,
        sweep_final_samples=400,
        train_overrides=(
            # grids only at the end of training: the pipeline scores the checkpoints itself
            "callbacks.guided_eval.num_samples=100",
            "callbacks.guided_eval.batch_size=100",
        ),
    ),
    # The whole pipeline in about a minute: scikit-learn's 8x8 digits, SiT-Micro/2, a few steps.
    "smoke": Preset(
        name="smoke",
        dataset="digits",
        steps=8,
        checkpoint_every=4,
        table_samples=20,
        curve_samples=16,
        heatmap_samples=16,
        heatmap_scales=(3.0,),
        heatmap_gammas=(0.0, 0.5, 0.9),
        sweep_trials=7,
        sweep_samples=16,
        sweep_final_samples=20,
        sampler_steps=2,
        eval_batch_size=40,
        grid_size=10,
        classifier_epochs=1,
        train_overrides=(
            "model.name=SiT-Micro/2",
            "data.batch_size=16",
            "optim.warmup_steps=2",
            "trainer.val_every_n_steps=4",
            "trainer.log_every_n_steps=2",
            "callbacks.monitor_every_n_steps=2",
            "callbacks.checkpoint.last_every_n_steps=2",
            "callbacks.guided_eval.num_samples=10",
            "callbacks.guided_eval.batch_size=10",
            "callbacks.guided_eval.num_steps=2",
            "callbacks.guided_eval.grid_size=10",
        ),
    ),
}


@dataclass(frozen=True)
class Paths:
    """Where the pipeline reads and writes."""

    work: Path  # runs, evaluations, the study, stage markers and logs
    data: Path  # prepared datasets (the shards' root)
    docs: Path  # results.md and the PNGs

    def run_dir(self, model: str) -> Path:
        return self.work / f"train_{model}"

    def eval_dir(self, stage: str) -> Path:
        return self.work / "eval" / stage

    @property
    def sweep_dir(self) -> Path:  # the sweep writes its report under paths.runs_dir
        return self.work / "runs" / "sweeps" / STUDY

    @property
    def storage(self) -> Path:
        return self.work / "optuna" / f"{STUDY}.log"


def default_paths(preset: Preset) -> Paths:
    """The full preset writes runs/reproduce and docs/; any other preset keeps everything, its
    results.md included, under runs/reproduce-<preset> so that it never overwrites docs/."""
    if preset.name == "full":
        return Paths(work=ROOT / "runs" / "reproduce", data=ROOT / "data" / "shards", docs=ROOT / "docs")
    work = ROOT / "runs" / f"reproduce-{preset.name}"
    return Paths(work=work, data=ROOT / "data" / "shards", docs=work / "docs")


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``python -m <entry> <args>``, run once the stages it ``needs`` are done.

    A zero exit status is not enough to call it done (Lightning answers SIGTERM by saving a checkpoint
    and exiting 0): ``output`` must exist, and for a training hold global step ``step``.
    """

    name: str
    entry: str  # the module run as `python -m entry`
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    output: Path | None = None  # the file the stage leaves behind; what the report reads
    step: int | None = None  # a training: ``output`` is its last.ckpt and must hold this global step
    cached: bool = False  # a cache shared with other runs (the dataset's classifier): made once, never replaced
    info: dict = field(default_factory=dict)  # what the report needs to know (model, step, settings, w)

    def command(self, fresh: bool = False) -> list[str]:
        """The argv. An interrupted training continues where it stopped: sgexp.train does that from
        the run directory's newest checkpoint anyway (``sgexp.runs.continue_from``); ``resume=`` puts
        it in the log. ``fresh``: the command before any attempt, as docs/results.md prints it."""
        argv = [sys.executable, "-m", self.entry, *self.args]
        if self.step is not None and not fresh and self.output.is_file():
            argv.append(f"resume={rel(self.output.parents[1])}")
        return argv

    def shell(self, fresh: bool = False) -> str:
        """The command as one shell line, as docs/results.md prints it."""
        return shlex.join([interpreter(), *self.command(fresh)[1:]])


def _name(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def _inline(setting: dict) -> str:
    """A setting as a Hydra inline mapping: ``{rule: sg, scale: 5.0, gamma_strong: 0.5}``."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in setting.items()) + "}"


def heatmap_settings(preset: Preset, scale: float) -> dict[str, dict]:
    """SG at every grid pair with γ_s < γ_w (constant SG needs γ_s < γ_w; the other cells stay empty)."""
    g = preset.heatmap_gammas
    return {f"hm_s{_name(s)}_w{_name(w)}": _sg(scale, s, w) for s in g for w in g if s < w}


def build_plan(preset: Preset, paths: Paths, tracking_uri: str | None = None) -> list[Stage]:
    """The stages of ``preset``, in the order they are started when their dependencies allow.

    ``tracking_uri`` None runs without MLflow (the default: the stages run side by side and the
    default sqlite store is meant for one writer); give an MLflow server's URI to track everything.
    """
    if preset.steps % preset.checkpoint_every:
        raise fail("checkpoint_every", preset.checkpoint_every, f"must divide steps={preset.steps}")
    p, dataset = preset, paths.data / preset.dataset
    common = ("paths.root=.", f"paths.data_dir={rel(paths.data)}", f"paths.runs_dir={rel(paths.work / 'runs')}")
    logger = (f"logger.tracking_uri={tracking_uri}",) if tracking_uri else ("logger.enabled=false",)
    data = ("--root", rel(paths.data))

    # The dataset, its domain-FID classifier and reference statistics, made once before anything reads
    # them: stages that run side by side would otherwise race to write the same files.
    stages = [
        Stage("prepare", "sgexp.data", ("prepare", p.dataset, *data), output=dataset / "meta.json"),
        Stage(
            "classifier",
            "sgexp.data",
            ("classifier", p.dataset, *data, "--epochs", str(p.classifier_epochs)),
            ("prepare",),
            output=dataset / "classifier.pt",
            cached=True,
        ),
        Stage(
            "ref_stats",
            "sgexp.data",
            ("ref-stats", p.dataset, *data, "--extractor", "classifier", "--split", "val"),
            ("classifier",),
            output=stats_path(dataset, "classifier", "val"),
        ),
    ]
    for model in MODELS:
        run_dir = paths.run_dir(model)
        args = (f"experiment=mnist_{model}", f"data={p.dataset}", *common, f"paths.run_dir={rel(run_dir)}")
        args += (f"seed={p.seed}", f"trainer.max_steps={p.steps}", "trainer.max_time=null", "trainer.progress=none")
        args += ("callbacks.guided_eval.extractor=none", f"callbacks.checkpoint.every_n_steps={p.checkpoint_every}")
        args += (*logger, *p.train_overrides)
        output = run_dir / "checkpoints" / "last.ckpt"
        info = {"model": model, "steps": p.steps}
        stages.append(Stage(f"train_{model}", "sgexp.train", args, ("prepare",), output, p.steps, info=info))

    def evaluate(name: str, model: str, ckpt: str, settings: dict[str, dict], samples: int, info=None) -> Stage:
        """``sgexp.evaluate`` of ``settings`` on a checkpoint of ``model``; ``info``: for the report."""
        checkpoint = paths.run_dir(model) / "checkpoints" / ckpt
        args = (f"checkpoint={rel(checkpoint)}", "guidance=[]")
        args += tuple(f"+guidance.{key}={_inline(s)}" for key, s in settings.items())
        args += (f"num_samples={samples}", f"batch_size={p.eval_batch_size}", f"seed={p.seed}")
        args += (f"sampler.steps={p.sampler_steps}", f"grid_size={min(p.grid_size, samples)}")
        args += (f"out_dir={rel(paths.eval_dir(name))}", *common, *logger)
        output = paths.eval_dir(name) / "results.json"
        needs = ("ref_stats", f"train_{model}")
        return Stage(name, "sgexp.evaluate", args, needs, output, info={"settings": settings, **(info or {})})

    # The whole guidance table in one evaluation: every two of its settings then share one results.json, and
    # so a paired bootstrap interval of their FID difference, which decides the claims (reproduce/claims.py).
    table = {key: setting for group in p.guidance.values() for key, setting in group.items()}
    stages.append(evaluate("guidance", "tread", "last.ckpt", table, p.table_samples))
    # Unguided FID at every kept checkpoint of both models; the last points are the final comparison.
    # Dense first: when its training ends, its points are what the report misses most.
    none = {"none": p.guidance["base"]["none"]}
    for model in reversed(MODELS):
        for step in range(p.checkpoint_every, p.steps + 1, p.checkpoint_every):
            ckpt = f"step-{step:07d}.ckpt" if step < p.steps else "last.ckpt"
            stages.append(
                evaluate(f"curve_{model}_{step}", model, ckpt, none, p.curve_samples, {"model": model, "step": step})
            )
    for scale in p.heatmap_scales:
        settings = heatmap_settings(p, scale)
        stages.append(
            evaluate(f"heatmap_w{_name(scale)}", "tread", "last.ckpt", settings, p.heatmap_samples, {"scale": scale})
        )

    sweep = ("--study", STUDY, "--storage", rel(paths.storage), "--n-trials", str(p.sweep_trials))
    sweep += ("--samples", str(p.sweep_samples), "--final-samples", str(p.sweep_final_samples))
    sweep += ("--tracking-uri", tracking_uri) if tracking_uri else ()
    sets = (f"checkpoint={rel(paths.run_dir('tread'))}", *common, f"sampler.steps={p.sampler_steps}")
    sets += (f"batch_size={p.eval_batch_size}", f"grid_size={min(p.grid_size, p.sweep_samples)}", f"seed={p.seed}")
    sets += () if tracking_uri else ("logger.enabled=false",)
    sweep += tuple(arg for item in sets for arg in ("--set", item))
    summary = paths.sweep_dir / "report" / "summary.json"
    stages.append(Stage("sweep", "sgexp.sweeps", sweep, ("ref_stats", "train_tread"), summary))
    return stages
