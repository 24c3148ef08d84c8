"""What scoring guidance settings on a checkpoint needs, loaded once: ``Evaluator``.

``python -m sgexp.evaluate`` and every sweep worker load a checkpoint's EMA model (and
AutoGuidance's weak model), the feature extractor and its reference statistics the same
way, through ``load_evaluator``; ``Evaluator.score`` returns one results row. A model
trained on latents is scored on decoded images: the dataset's meta.json names the VAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from sgexp import runs
from sgexp.checks import fail
from sgexp.eval.sampling import save_grid, score_setting
from sgexp.lit.module import FlowMatchingModule


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
        from mlflow.tracking import MlflowClient

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


def load_ema(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, FlowMatchingModule]:
    module = FlowMatchingModule.load_from_checkpoint(ckpt, map_location=device)
    if module.config.prediction != "velocity":  # samplers and guidance rules integrate a velocity field
        raise ValueError(
            f"checkpoint={str(ckpt)!r} is invalid: it holds a {module.config.prediction}-prediction network "
            "(the official DiT, a DDPM model), which sgexp's flow samplers cannot use as is: fine-tune it first "
            "(python -m sgexp.train experiment=... init_from=THIS_CHECKPOINT), then evaluate that run"
        )
    return module.ema.model.to(device).eval(), module


def check_weak_model(main, weak, ckpt: Path) -> None:
    """AutoGuidance combines two predictions of the same quantity: shapes and classes must agree."""
    for key in ("input_size", "in_channels", "num_classes"):
        if getattr(main.config, key) != getattr(weak.config, key):
            raise ValueError(
                f"weak_checkpoint={str(ckpt)!r} is invalid: its {key}={getattr(weak.config, key)} differs from the "
                f"main model's {getattr(main.config, key)}"
            )


@dataclass
class Evaluator:
    """The model(s), extractor and reference statistics, loaded once per process."""

    checkpoint: Path
    dataset: str
    models: dict
    configs: dict
    extractor: Any
    reference: Any
    sampler: Any
    device: torch.device
    batch_size: int
    decode: Any = None  # latents -> images in [-1, 1] (sgexp.vae.LatentVAE) for latent datasets
    reference_name: str = ""  # what the statistics are of, for reports

    @property
    def metric(self) -> str:
        return self.extractor.label

    def score(
        self, name: str, setting: dict, num_samples: int, seed: int, grid: Path | None, grid_size: int, progress=None
    ) -> dict:
        """One results row of ``score_setting``; ``row["grid"]`` is the saved sample grid, if any."""
        from sgexp.lit.eval_callback import make_settings

        [built] = make_settings({name: setting})
        row, images = score_setting(
            built, self.models, self.configs, self.sampler, self.extractor, self.reference, num_samples,
            seed, self.batch_size, self.device, self.decode, grid_size=grid_size if grid else 0, progress=progress,
        )  # fmt: skip
        if images is not None and grid is not None:
            row["grid"] = str(save_grid(images, grid, nrow=min(self.configs["main"].num_classes, 10, len(images))))
        return row


def load_evaluator(cfg: DictConfig, tracking_uri: str | None) -> Evaluator:
    """Load everything once, before any sampling: a missing checkpoint, classifier or
    Inception weights file fails here, not after an hour of work. ``cfg`` has the keys of
    ``configs/evaluate.yaml`` (checkpoint, weak_checkpoint, device, paths, extractor, ...);
    ``vae`` (where the dataset's VAE is, if not where meta.json says) and ``reference_batch``
    (an ADM reference npz instead of the dataset's statistics) are optional."""
    from sgexp.data import read_meta
    from sgexp.diffusion.sampler import Sampler
    from sgexp.eval import build_extractor, reference_stats
    from sgexp.eval.reference_batch import load_reference_batch

    auto = cfg.device == "auto"
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if auto else cfg.device)
    runs_dir = Path(cfg.paths.runs_dir)
    ckpt = find_checkpoint(cfg.checkpoint, runs_dir, tracking_uri)
    model, module = load_ema(ckpt, device)
    models, configs = {"main": model}, {"main": module.config}
    if cfg.weak_checkpoint:
        weak_ckpt = find_checkpoint(cfg.weak_checkpoint, runs_dir, tracking_uri)
        models["weak"], weak = load_ema(weak_ckpt, device)
        check_weak_model(module, weak, weak_ckpt)
        configs["weak"] = weak.config
    dataset = module.hparams.get("dataset")
    if not dataset:
        raise fail("checkpoint", str(ckpt), "it does not record its dataset (hparam 'dataset')")
    data_dir = Path(cfg.paths.data_dir) / dataset
    name = cfg.extractor
    if name == "auto":
        name = "classifier" if (data_dir / "classifier.pt").is_file() else "inception"
    extractor = build_extractor(name, data_dir, device=device, weights=cfg.inception_weights)
    decode = None
    meta = read_meta(data_dir)
    if meta.get("format") == "latent":
        from sgexp.vae import vae_for_dataset

        decode = vae_for_dataset(meta, cfg.get("vae"), device)
    if cfg.get("reference_batch"):
        reference = load_reference_batch(cfg.reference_batch, extractor, device=device)
        reference_name = str(cfg.reference_batch)
    else:
        reference = reference_stats(extractor, data_dir, cfg.reference_split, device=device)
        reference_name = f"{dataset}/{cfg.reference_split}"
    sampler = Sampler(cfg.sampler.solver, cfg.sampler.steps)
    return Evaluator(ckpt, dataset, models, configs, extractor, reference, sampler, device, cfg.batch_size, decode,
                     reference_name)  # fmt: skip
