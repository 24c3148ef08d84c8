"""Score a checkpoint under several guidance settings: quality, GFLOPs and time per sample.

    python -m sgexp.evaluate                                   # latest run, guidance=[none,cfg,sg]
    python -m sgexp.evaluate checkpoint=runs/mnist_tread/20261127-101500 num_samples=2000
    python -m sgexp.evaluate guidance=[cfg,sg,sg_cosine] guidance.sg.scale=8
    python -m sgexp.evaluate guidance=[ag_sg] weak_checkpoint=runs/.../checkpoints/step-0001000.ckpt

Every setting is scored on the same sample indices (same noise, labels and routing
seeds), so differences between rows are differences between settings. Prints a
table, writes ``results.json`` and sample grids, and logs an MLflow run nested
under the training run. ``run(cfg)`` is what tests call through the compose API.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from sgexp import tracking
from sgexp.config import register_configs
from sgexp.diffusion.sampler import Sampler
from sgexp.eval.sampling import save_grid, score_setting
from sgexp.lit.eval_callback import make_settings
from sgexp.lit.module import FlowMatchingModule

log = logging.getLogger("sgexp.evaluate")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
COLUMNS = [
    ("setting", "{}"),
    ("scale", "{:g}"),
    ("strong", "{}"),
    ("weak", "{}"),
    ("fid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("class_accuracy", "{:.3f}"),
    ("gflops_per_sample", "{:.4g}"),
    ("relative_to_cfg", "{:.3f}"),
    ("seconds_per_sample", "{:.4f}"),
]


def find_checkpoint(spec: str, runs_dir: Path, tracking_uri: str | None) -> Path:
    """A .ckpt path, a run directory, ``latest`` (newest run under ``runs_dir``), or an MLflow run id."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").is_file():
        return (path / "checkpoints" / "last.ckpt").resolve()
    if spec == "latest":
        found = sorted(runs_dir.glob("*/*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"checkpoint='latest' is invalid: no run with checkpoints/last.ckpt under {runs_dir}"
                " (run `make train` first, or pass checkpoint=PATH)"
            )
        return found[-1]
    if tracking_uri and len(spec) == 32 and all(ch in "0123456789abcdef" for ch in spec):
        from mlflow.tracking import MlflowClient

        tags = MlflowClient(tracking_uri).get_run(spec).data.tags
        ckpt = Path(tags.get("sgexp.checkpoint_dir", "")) / "last.ckpt"
        if ckpt.is_file():
            return ckpt
    raise FileNotFoundError(
        f"checkpoint={spec!r} is invalid: not a checkpoint file, a run directory with checkpoints/last.ckpt, "
        "'latest', or an MLflow run id whose checkpoints are on this machine"
    )


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_ema(ckpt: Path, device: torch.device) -> tuple[torch.nn.Module, FlowMatchingModule]:
    module = FlowMatchingModule.load_from_checkpoint(ckpt, map_location=device)
    return module.ema.model.to(device).eval(), module


def check_weak_model(main, weak, ckpt: Path) -> None:
    """AutoGuidance combines two predictions of the same quantity: shapes and classes must agree."""
    for key in ("input_size", "in_channels", "num_classes"):
        if getattr(main.config, key) != getattr(weak.config, key):
            raise ValueError(
                f"weak_checkpoint={str(ckpt)!r} is invalid: its {key}={getattr(weak.config, key)} differs from the "
                f"main model's {getattr(main.config, key)}"
            )


def run(cfg: DictConfig) -> dict:
    root = Path(cfg.paths.root).resolve()
    cfg.paths.root = str(root)
    device = torch.device(
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device
    )
    settings = make_settings(OmegaConf.to_container(cfg.guidance, resolve=True))
    if not settings:
        raise ValueError("guidance={} is invalid: select at least one setting, e.g. guidance=[none,cfg,sg]")
    sampler = Sampler(cfg.sampler.solver, cfg.sampler.steps)
    needs_weak = [s.name for s in settings if "weak" in s.rule.models]
    if needs_weak and not cfg.weak_checkpoint:
        raise ValueError(
            f"weak_checkpoint=None is invalid: settings {needs_weak} (AutoGuidance) need a weak checkpoint"
        )
    tracking_uri = tracking.resolve_tracking_uri(cfg.logger.tracking_uri, root) if cfg.logger.enabled else None
    if tracking_uri:
        tracking.check_tracking_uri(tracking_uri)

    ckpt = find_checkpoint(cfg.checkpoint, Path(cfg.paths.runs_dir), tracking_uri)
    model, module = load_ema(ckpt, device)
    models, configs = {"main": model}, {"main": module.config}
    if needs_weak:
        weak_ckpt = find_checkpoint(cfg.weak_checkpoint, Path(cfg.paths.runs_dir), tracking_uri)
        models["weak"], weak_module = load_ema(weak_ckpt, device)
        check_weak_model(module, weak_module, weak_ckpt)
        configs["weak"] = weak_module.config

    # Features and reference statistics before any sampling: a missing classifier or
    # Inception weights file fails now, not after an hour of sampling.
    from sgexp.eval import build_extractor, reference_stats

    dataset = module.hparams.get("dataset")
    if not dataset:
        raise ValueError(f"checkpoint={str(ckpt)!r} is invalid: it does not record its dataset (hparam 'dataset')")
    data_dir = Path(cfg.paths.data_dir) / dataset
    name = cfg.extractor
    if name == "auto":
        name = "classifier" if (data_dir / "classifier.pt").is_file() else "inception"
    extractor = build_extractor(name, data_dir, device=device, weights=cfg.inception_weights)
    reference = reference_stats(extractor, data_dir, cfg.reference_split, device=device)

    run_dir = run_dir_of(ckpt)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _score_all(settings, models, configs, sampler, extractor, reference, cfg, device, out_dir)

    results = {
        "checkpoint": str(ckpt),
        "step": int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", -1)),
        "dataset": dataset,
        "metric": extractor.label,
        "reference_split": cfg.reference_split,
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    if tracking_uri:
        results["mlflow_run_id"] = _log_to_mlflow(cfg, results, out_dir, run_dir, tracking_uri, root)
    results["out_dir"] = str(out_dir)
    return results


def _score_all(settings, models, configs, sampler, extractor, reference, cfg, device, out_dir) -> list[dict]:
    from rich.progress import Progress

    rows = []
    with Progress(disable=os.environ.get("RANK", "0") != "0") as progress:
        for setting in settings:
            task = progress.add_task(f"{setting.name:>12}", total=cfg.num_samples)
            row, grid = score_setting(
                setting,
                models,
                configs,
                sampler,
                extractor,
                reference,
                cfg.num_samples,
                cfg.seed,
                cfg.batch_size,
                device,
                grid_size=cfg.grid_size,
                progress=lambda n, task=task: progress.advance(task, n),
            )
            if grid is not None:
                nrow = min(configs["main"].num_classes, 10, len(grid))
                row["grid"] = str(save_grid(grid, out_dir / f"{setting.name}.png", nrow=nrow))
            rows.append(row)
    return rows


def _print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{results['metric']} vs {results['dataset']}/{results['reference_split']}, "
        f"{results['num_samples']} samples, step {results['step']}"
    )
    for key, _ in COLUMNS:
        table.add_column(key.replace("_", " "), justify="left" if key in ("setting", "strong", "weak") else "right")
    for row in results["rows"]:
        table.add_row(*(fmt.format(row[key]) if row.get(key) is not None else "-" for key, fmt in COLUMNS))
    # Logs and CI capture stdout: give the table room instead of rich's 80-column default.
    Console(width=None if sys.stdout.isatty() else 180).print(table)


def _log_to_mlflow(cfg, results: dict, out_dir: Path, run_dir: Path, tracking_uri: str, root: Path) -> str:
    """An evaluation run nested under the training run (same experiment, parentRunId tag)."""
    parent_file = run_dir / tracking.RUN_ID_FILE
    tags = {"sgexp.kind": "evaluation", "sgexp.checkpoint": results["checkpoint"]}
    if parent_file.is_file():
        tags["mlflow.parentRunId"] = parent_file.read_text().strip()
    run_id = tracking.open_run(out_dir, tracking_uri, cfg.logger.experiment, f"eval/{out_dir.name}", tags=tags)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    tracking.log_run_context(
        client, run_id, config=OmegaConf.to_container(cfg, resolve=True), meta=None, checkpoint_dir=None, root=root
    )
    for row in results["rows"]:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                client.log_metric(run_id, f"{row['setting']}/{key}", float(value), step=max(results["step"], 0))
        if "grid" in row:
            client.log_artifact(run_id, row["grid"], "samples")
    client.log_artifact(run_id, str(out_dir / "results.json"))
    client.set_terminated(run_id)
    return run_id


def main() -> None:
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
