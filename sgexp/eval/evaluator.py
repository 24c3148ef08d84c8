"""What scoring guidance settings on a checkpoint needs, loaded once: ``Evaluator``.

``python -m sgexp.evaluate`` and every sweep worker load a checkpoint's EMA model (and
AutoGuidance's weak model), the feature extractor and its reference statistics the same
way, through ``load_evaluator``; ``Evaluator.score`` returns one results row. A model
trained on latents is scored on decoded images: the dataset's meta.json names the VAE.

The network is read from the checkpoint file itself (``sgexp.runs.open_checkpoint``,
memory-mapped): only the EMA weights are copied, never the optimizer state that makes
up most of an XL/2 training checkpoint, and nothing of the training code is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from sgexp import runs
from sgexp.checks import fail
from sgexp.config import use_compile
from sgexp.diffusion.sampler import Sampler
from sgexp.eval.features import FeatureExtractor
from sgexp.eval.metrics import ReferenceStats
from sgexp.eval.sampling import Setting, save_grid, score_setting
from sgexp.eval.scoring import load_scoring
from sgexp.eval.settings import make_settings
from sgexp.models.dit import DiT, DiTConfig
from sgexp.vae import LatentVAE

# FlowMatchingModule (sgexp.lit.module) keeps the averaged network as ``self.ema.model``
# (sgexp.lit.ema.EMA), so its weights are the state_dict entries under this prefix.
EMA_PREFIX = "ema.model."


@dataclass
class EMANetwork:
    """The averaged network of a training checkpoint, with what evaluation reads beside it."""

    model: DiT
    config: DiTConfig
    step: int
    dataset: str | None  # the prepared dataset it was trained on (its reference data)


def load_ema(ckpt: Path, device: torch.device | str) -> EMANetwork:
    """The EMA network of a training checkpoint, in eval mode on ``device``: one memory-mapped read."""
    state = runs.open_checkpoint(ckpt, mmap=True)
    hparams = state["hyper_parameters"]
    config = DiTConfig.from_dict(dict(hparams["model"]))
    if config.prediction != "velocity":  # samplers and guidance rules integrate a velocity field
        raise ValueError(
            f"checkpoint={str(ckpt)!r} is invalid: it holds a {config.prediction}-prediction network "
            "(the official DiT, a DDPM model), which sgexp's flow samplers cannot use as is: fine-tune it first "
            "(python -m sgexp.train experiment=... init_from=THIS_CHECKPOINT), then evaluate that run"
        )
    weights = {k.removeprefix(EMA_PREFIX): v for k, v in state["state_dict"].items() if k.startswith(EMA_PREFIX)}
    with torch.device(device):  # initialise on the target device, then copy the mapped weights in
        model = DiT(config)
    model.load_state_dict(weights, strict=True)
    model = model.to(device).eval().requires_grad_(False)
    return EMANetwork(model, config, int(state["global_step"]), hparams.get("dataset"))


def find_checkpoint(spec: str, runs_dir: Path, tracking_uri: str | None) -> Path:
    """A .ckpt path, a run directory (its newest checkpoint, ``sgexp.runs``), ``latest`` (newest run
    under ``runs_dir``), or an MLflow run id. The file is checked to be a usable training checkpoint."""
    path = Path(spec).expanduser()
    if path.is_file():
        return _usable(path.resolve(), spec)
    if path.is_dir() and (newest := runs.newest_checkpoint(path)) is not None:
        return newest.path.resolve()
    if spec == "latest":
        found = sorted(runs_dir.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"checkpoint='latest' is invalid: no run with checkpoints/last.ckpt under {runs_dir}"
                " (run `make train` first, or pass checkpoint=PATH)"
            )
        return _usable(found[-1], spec)
    if tracking_uri and len(spec) == 32 and all(ch in "0123456789abcdef" for ch in spec):
        from mlflow.tracking import MlflowClient  # mlflow takes seconds to import: only for a run id

        tags = MlflowClient(tracking_uri).get_run(spec).data.tags
        ckpt = Path(tags.get("sgexp.checkpoint_dir", "")) / "last.ckpt"
        if ckpt.is_file():
            return _usable(ckpt, spec)
    raise FileNotFoundError(
        f"checkpoint={spec!r} is invalid: not a checkpoint file, a run directory with checkpoints, "
        "'latest', or an MLflow run id whose checkpoints are on this machine"
    )


def _usable(ckpt: Path, spec: str) -> Path:
    try:
        runs.open_checkpoint(ckpt)
    except runs.CheckpointError as err:
        others = runs.describe_checkpoints(runs.run_dir_of(ckpt))
        raise ValueError(f"checkpoint={spec!r} is invalid: {err}. Checkpoints of that run: {others}") from None
    return ckpt


def check_weak_model(main: DiTConfig, weak: DiTConfig, ckpt: Path) -> None:
    """AutoGuidance combines two predictions of the same quantity: shapes and classes must agree."""
    for key in ("input_size", "in_channels", "num_classes"):
        if getattr(main, key) != getattr(weak, key):
            raise ValueError(
                f"weak_checkpoint={str(ckpt)!r} is invalid: its {key}={getattr(weak, key)} differs from the "
                f"main model's {getattr(main, key)}"
            )


@dataclass
class Evaluator:
    """The model(s), extractor and reference statistics, loaded once per process."""

    checkpoint: Path
    step: int  # the checkpoint's global step
    dataset: str
    models: dict[str, DiT]  # "main", and "weak" for AutoGuidance
    configs: dict[str, DiTConfig]
    extractor: FeatureExtractor
    reference: ReferenceStats
    reference_name: str  # what the statistics are of, for reports
    sampler: Sampler
    device: torch.device
    batch_size: int
    decode: LatentVAE | None = None  # latents -> images in [-1, 1] for latent datasets

    @property
    def metric(self) -> str:
        return self.extractor.label

    def score(
        self,
        name: str,
        setting: Mapping | Setting,
        num_samples: int,
        seed: int,
        grid: Path | None,
        grid_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> dict:
        """One results row of ``score_setting``; ``row["grid"]`` is the saved sample grid, if any.

        ``setting`` is a built ``Setting`` (``sgexp.evaluate`` validates all of them first) or
        its mapping ``{rule, scale, gamma_strong, ...}`` (a sweep trial's point), built here.
        ``progress(n)`` is called after each batch with its size by a caller that shows the
        pass's progress itself (a sweep's live view); without it the pass shows its own bar or
        lines (``sgexp.progress``)."""
        return self.score_with_features(name, setting, num_samples, seed, grid, grid_size, progress)[0]

    def score_with_features(
        self,
        name: str,
        setting: Mapping | Setting,
        num_samples: int,
        seed: int,
        grid: Path | None,
        grid_size: int,
        progress: Callable[[int], None] | None = None,
        labels: str = "balanced",
        npz: Path | None = None,
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """``score``'s row and the features its Fréchet distances were computed from, by metric name,
        float32 in sample-index order: ``"fid"`` -> (num_samples, dim) pool features, and with an
        extractor that has spatial features (``inception_tf``) ``"sfid"`` -> (num_samples, 2023).
        What bootstrap intervals resample (``sgexp.eval.bootstrap``) without sampling again.
        ``labels`` (``balanced`` or ``uniform``) and ``npz`` (write the samples there for ADM's
        evaluator) are ``score_setting``'s."""
        built = setting if isinstance(setting, Setting) else make_settings({name: setting})[0]
        row, scored = score_setting(
            built,
            self.models,
            self.configs,
            self.sampler,
            self.extractor,
            self.reference,
            num_samples,
            seed,
            self.batch_size,
            self.device,
            self.decode,
            grid_size=grid_size if grid else 0,
            progress=progress,
            labels=labels,
            npz=npz,
            show_progress=progress is None,  # one display per pass: the caller's, else the pass's own
        )
        images = scored.grid
        if images is not None and grid is not None:
            row["grid"] = str(save_grid(images, grid, nrow=min(self.configs["main"].num_classes, 10, len(images))))
        features = {"fid": scored.features}
        if scored.spatial is not None:
            features["sfid"] = scored.spatial
        return row, features


def load_evaluator(cfg: DictConfig, tracking_uri: str | None) -> Evaluator:
    """Load everything once, before any sampling: a missing checkpoint, classifier or
    Inception weights file fails here, not after an hour of work. ``cfg`` has the keys of
    ``EvaluateConfig`` (checkpoint, weak_checkpoint, device, paths, extractor, ...);
    ``vae`` (where the dataset's VAE is, if not where meta.json says) and ``reference_batch``
    (an ADM reference npz instead of the dataset's statistics) are optional."""
    if cfg.extractor == "none":
        raise fail("extractor", "none", "evaluation reports metrics: use auto, classifier, inception or inception_tf")
    auto = cfg.device == "auto"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else cfg.device)
    # a bad compile value fails here, before any loading. A sweep's config has no such key: its trials draw new
    # γ's, and so new kept-token counts, each a graph to compile; they run eagerly.
    compile_mode = cfg.get("compile_mode", "default")
    compile_networks = use_compile(cfg.get("compile", False), compile_mode, device.type, key="compile")
    runs_dir = Path(cfg.paths.runs_dir)
    ckpt = find_checkpoint(cfg.checkpoint, runs_dir, tracking_uri)
    main = load_ema(ckpt, device)
    models, configs = {"main": main.model}, {"main": main.config}
    if cfg.weak_checkpoint:
        weak_ckpt = find_checkpoint(cfg.weak_checkpoint, runs_dir, tracking_uri)
        weak = load_ema(weak_ckpt, device)
        check_weak_model(main.config, weak.config, weak_ckpt)
        models["weak"], configs["weak"] = weak.model, weak.config
    if not main.dataset:
        raise fail("checkpoint", str(ckpt), "it does not record its dataset (hparam 'dataset')")
    if compile_networks:  # the draws stay eager: the same samples as without (sgexp.diffusion.guided_step)
        for model in models.values():
            model.compile_core(mode=compile_mode)
    scoring = load_scoring(
        cfg.extractor,
        Path(cfg.paths.data_dir) / main.dataset,
        cfg.reference_split,
        cfg.get("reference_batch"),
        weights=cfg.inception_weights,
        vae=cfg.get("vae"),
        device=device,
    )
    return Evaluator(
        checkpoint=ckpt,
        step=main.step,
        dataset=main.dataset,
        models=models,
        configs=configs,
        extractor=scoring.extractor,
        reference=scoring.reference,
        reference_name=scoring.reference_name,
        sampler=Sampler(cfg.sampler.solver, cfg.sampler.steps),
        device=device,
        batch_size=cfg.batch_size,
        decode=scoring.decode,
    )
