"""Presets of the reproduction and the stages they expand to.

A preset fixes every number a result depends on (training steps, sample counts, seeds, guidance
settings, the sparsity grid) before anything runs; ``build_plan`` turns it into stages, each a
command of the project's own entry points with its dependencies and the file it leaves behind.
The guidance settings are chosen from DESIGN.md's prototype (CFG best near w=1.5, SG near w=5-8)
and the paper's defaults, not from this run's results.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sgexp.checks import fail

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("tread", "dense")  # the two trainings; experiment mnist_<model>


def _sg(scale: float, strong: float, weak: float, rule: str = "sg") -> dict:
    return {"rule": rule, "scale": scale, "gamma_strong": f"{strong:g}", "gamma_weak": f"{weak:g}"}


# The guidance table on the TREAD model, one evaluation stage per group (all on the same sample seeds).
# none_sparse is ω=1 at test-time sparsity 0.5: the paper says unguided quality degrades with γ.
GUIDANCE: dict[str, dict[str, dict]] = {
    "base": {"none": {"rule": "none", "scale": 1.0}, "none_sparse": {"rule": "none", "gamma_strong": "0.5"}},
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
    def sweep_dir(self) -> Path:  # sgexp.sweep writes its report under paths.runs_dir
        return self.work / "runs" / "sweeps" / "sparsity_pareto"

    @property
    def storage(self) -> Path:
        return self.work / "optuna" / "sparsity_pareto.log"


@dataclass
class Stage:
    """One step of the pipeline: a subprocess ``command()`` (built when it starts, so a training
    can resume from what is on disk) or an in-process ``action()``, run once ``needs`` are done."""

    name: str
    needs: tuple[str, ...] = ()
    command: Callable[[], list[str]] | None = None
    action: Callable[[], None] | None = None
    output: Path | None = None  # what the report reads
    info: dict = field(default_factory=dict)  # what the report needs to know about the stage
    # Why the stage's work is not complete despite a zero exit status, or None when it is: Lightning
    # answers SIGTERM (a kill, a preemption) by stopping early and exiting 0.
    incomplete: Callable[[], str | None] = lambda: None

    def shell(self, fresh: bool = False) -> str:
        """The command as one shell line (for the log and docs/results.md); ``fresh``: as it is
        before any attempt (without the ``resume=`` an interrupted training adds)."""
        if self.command is None:
            return f"(in process: {self.name})"
        argv = [a for a in self.command() if not (fresh and a.startswith("resume="))]
        if argv[0] == sys.executable:
            argv = [".venv/bin/python", *argv[1:]]
        return shlex.join(argv)


def _inline(setting: dict) -> str:
    """A setting as a Hydra inline mapping: ``{rule: sg, scale: 5.0, gamma_strong: "0.5"}``."""
    items = [f'{k}: "{v}"' if isinstance(v, str) and k.startswith("gamma") else f"{k}: {v}" for k, v in setting.items()]
    return "{" + ", ".join(items) + "}"


def _name(value: float) -> str:
    return f"{value:g}".replace(".", "p")


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
    py = sys.executable
    common = [f"paths.root={ROOT}", f"paths.data_dir={paths.data}", f"paths.runs_dir={paths.work / 'runs'}"]
    logger = [f"logger.tracking_uri={tracking_uri}"] if tracking_uri else ["logger.enabled=false"]

    def train(model: str) -> Callable[[], list[str]]:
        run_dir = paths.run_dir(model)

        def command() -> list[str]:
            argv = [py, "-m", "sgexp.train", f"experiment=mnist_{model}", f"data={preset.dataset}", *common]
            argv += [f"paths.run_dir={run_dir}", f"seed={preset.seed}", f"trainer.max_steps={preset.steps}"]
            argv += ["trainer.max_time=null", "trainer.progress=none", "callbacks.guided_eval.extractor=none"]
            argv += [f"callbacks.checkpoint.every_n_steps={preset.checkpoint_every}", *logger]
            argv += list(preset.train_overrides)
            if (run_dir / "checkpoints" / "last.ckpt").is_file():  # interrupted: continue where it stopped
                argv.append(f"resume={run_dir}")
            return argv

        return command

    def evaluate(stage: str, checkpoint: Path, settings: dict[str, dict], samples: int) -> Callable[[], list[str]]:
        def command() -> list[str]:
            argv = [py, "-m", "sgexp.evaluate", f"checkpoint={checkpoint}", "guidance=[]"]
            argv += [f"+guidance.{name}={_inline(s)}" for name, s in settings.items()]
            argv += [f"num_samples={samples}", f"batch_size={preset.eval_batch_size}", f"seed={preset.seed}"]
            argv += [f"sampler.steps={preset.sampler_steps}", f"grid_size={min(preset.grid_size, samples)}"]
            argv += [f"out_dir={paths.eval_dir(stage)}", *common, *logger]
            return argv

        return command

    def sweep() -> list[str]:
        argv = [py, "-m", "sgexp.sweep", "--study", "sparsity_pareto", "--storage", str(paths.storage)]
        argv += ["--n-trials", str(preset.sweep_trials), "--samples", str(preset.sweep_samples)]
        argv += ["--final-samples", str(preset.sweep_final_samples)]
        if tracking_uri:
            argv += ["--tracking-uri", tracking_uri]
        sets = [f"checkpoint={paths.run_dir('tread')}", *common, f"sampler.steps={preset.sampler_steps}"]
        sets += [f"batch_size={preset.eval_batch_size}", f"grid_size={min(preset.grid_size, preset.sweep_samples)}"]
        sets += [f"seed={preset.seed}", *([] if tracking_uri else ["logger.enabled=false"])]
        for item in sets:
            argv += ["--set", item]
        return argv

    def prepare() -> None:
        from sgexp.reproduce.runner import prepare_dataset

        prepare_dataset(preset.dataset, paths.data, preset.classifier_epochs)

    def trained(model: str) -> Callable[[], str | None]:
        def incomplete() -> str | None:
            from sgexp.reproduce.results import training_step

            step = training_step(paths.run_dir(model))
            return None if step == preset.steps else f"stopped at step {step} of {preset.steps}"

        return incomplete

    stages = [Stage("prepare", action=prepare, info={"dataset": preset.dataset})]
    for model in MODELS:
        info = {"model": model, "steps": preset.steps}
        stage = Stage(f"train_{model}", ("prepare",), train(model), output=paths.run_dir(model), info=info)
        stage.incomplete = trained(model)
        stages.append(stage)
    tread_last = paths.run_dir("tread") / "checkpoints" / "last.ckpt"
    for group, settings in preset.guidance.items():
        name = f"guidance_{group}"
        command = evaluate(name, tread_last, settings, preset.table_samples)
        info = {"settings": settings}
        stages.append(Stage(name, ("train_tread",), command, output=paths.eval_dir(name) / "results.json", info=info))
    # Unguided FID at every kept checkpoint of both models; the last points are the final comparison.
    # Dense first: when its training ends, its points are what the report misses most.
    none = {"none": preset.guidance["base"]["none"]}
    for model in reversed(MODELS):
        for step in range(preset.checkpoint_every, preset.steps + 1, preset.checkpoint_every):
            file = f"step-{step:07d}.ckpt" if step < preset.steps else "last.ckpt"
            name = f"curve_{model}_{step}"
            stages.append(
                Stage(
                    name,
                    (f"train_{model}",),
                    evaluate(name, paths.run_dir(model) / "checkpoints" / file, none, preset.curve_samples),
                    output=paths.eval_dir(name) / "results.json",
                    info={"model": model, "step": step, "settings": none},
                )  # fmt: skip
            )
    for scale in preset.heatmap_scales:
        name, settings = f"heatmap_w{_name(scale)}", heatmap_settings(preset, scale)
        command = evaluate(name, tread_last, settings, preset.heatmap_samples)
        info = {"scale": scale, "settings": settings}
        stages.append(Stage(name, ("train_tread",), command, output=paths.eval_dir(name) / "results.json", info=info))
    stages.append(Stage("sweep", ("train_tread",), sweep, output=paths.sweep_dir / "report" / "summary.json"))
    for stage in stages[1 + len(MODELS) :]:  # evaluations and the sweep: their result file exists
        stage.incomplete = missing(stage.output)
    return stages


def missing(path: Path) -> Callable[[], str | None]:
    return lambda: None if path.is_file() else f"no {path}"


def default_paths(preset: Preset) -> Paths:
    """The full preset writes runs/reproduce and docs/; any other preset keeps everything, its
    results.md included, under runs/reproduce-<preset> so that it never overwrites docs/."""
    if preset.name == "full":
        return Paths(work=ROOT / "runs" / "reproduce", data=ROOT / "data" / "shards", docs=ROOT / "docs")
    work = ROOT / "runs" / f"reproduce-{preset.name}"
    return Paths(work=work, data=ROOT / "data" / "shards", docs=work / "docs")
