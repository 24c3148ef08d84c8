"""Score a checkpoint under several guidance settings: quality, GFLOPs and time per sample.

    python -m sgexp.evaluate                                   # latest run, guidance=[none,cfg,sg]
    python -m sgexp.evaluate checkpoint=runs/mnist_tread/20261127-101500 num_samples=2000
    python -m sgexp.evaluate guidance=[cfg,sg,sg_cosine] guidance.sg.scale=8
    python -m sgexp.evaluate guidance=[ag_sg] weak_checkpoint=runs/.../checkpoints/step-0001000.ckpt

Every setting is scored on the same sample indices (same noise, labels and routing
seeds), so differences between rows are differences between settings. Each FID (and
precision) gets a bootstrap interval over the sample indices (``bootstrap`` redraws,
``ci_level``), and each pair of settings a *paired* interval of its FID difference
(``sgexp.eval.bootstrap``): a pair whose interval excludes 0 differs beyond the noise of
the sample draw. Prints the tables, writes ``results.json`` (rows with ``fid_ci``, and
``paired``) and sample grids, and logs an MLflow run nested under the training run.
``run(cfg)`` is what tests call through the compose API.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

import hydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sgexp import run_record, runs, tracking
from sgexp.checks import check_positive_int, fail
from sgexp.config import register_configs
from sgexp.eval.bootstrap import check_level, compare_settings, sign
from sgexp.eval.evaluator import load_evaluator
from sgexp.eval.settings import make_settings

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


def run(cfg: DictConfig) -> dict:
    root = Path(cfg.paths.root).resolve()
    cfg.paths.root = str(root)
    check_positive_int("num_samples", cfg.num_samples)
    check_positive_int("batch_size", cfg.batch_size)
    if isinstance(cfg.bootstrap, bool) or not isinstance(cfg.bootstrap, int) or cfg.bootstrap < 0:
        raise fail("bootstrap", cfg.bootstrap, "must be an integer >= 0 (redraws of the sample indices; 0: none)")
    check_level(cfg.ci_level, "ci_level")
    settings = make_settings(OmegaConf.to_container(cfg.guidance, resolve=True))
    if not settings:
        raise ValueError("guidance={} is invalid: select at least one setting, e.g. guidance=[none,cfg,sg]")
    needs_weak = [s.name for s in settings if "weak" in s.rule.models]
    if needs_weak and not cfg.weak_checkpoint:
        raise ValueError(
            f"weak_checkpoint=None is invalid: settings {needs_weak} (AutoGuidance) need a weak checkpoint"
        )
    tracking_uri = tracking.tracking_uri_for(cfg.logger, root)
    # Models, features and reference statistics before any sampling: a missing classifier
    # or Inception weights file fails now, not after an hour of sampling.
    evaluator = load_evaluator(cfg, tracking_uri)
    ckpt = evaluator.checkpoint
    run_dir = runs.run_dir_of(ckpt)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run_dir / "eval" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)

    rows, features = [], {}
    for setting in settings:  # each pass shows its own progress (sgexp.eval.progress)
        row, features[setting.name] = evaluator.score_with_features(
            setting.name,
            setting,
            cfg.num_samples,
            cfg.seed,
            out_dir / f"{setting.name}.png",
            cfg.grid_size,
            labels=cfg.labels,
            npz=out_dir / f"{setting.name}.npz" if cfg.save_npz else None,
        )
        rows.append(row)
    paired = []
    if cfg.bootstrap:  # every setting on the same indices: one set of redraws serves all rows and pairs
        by_name = {row["setting"]: row for row in rows}
        cis, paired = compare_settings(
            features, by_name, evaluator.reference, cfg.bootstrap, cfg.ci_level, seed=cfg.seed
        )
        for row in rows:
            row.update(cis[row["setting"]])

    results = {
        "checkpoint": str(ckpt),
        "step": evaluator.step,
        "dataset": evaluator.dataset,
        "metric": evaluator.metric,
        "reference_split": cfg.reference_split,
        "reference": evaluator.reference_name,  # dataset/split, or the ADM reference batch file
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "ci": {"level": cfg.ci_level, "bootstrap": cfg.bootstrap},
        "rows": rows,
        "paired": paired,  # FID(a) - FID(b) with its paired interval, for every pair of settings
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    if tracking_uri:
        results["mlflow_run_id"] = _log_to_mlflow(cfg, results, out_dir, run_dir, tracking_uri, root)
    results["out_dir"] = str(out_dir)
    return results


def _print_table(results: dict) -> None:
    table = Table(
        title=f"{results['metric']} vs {results['reference']}, {results['num_samples']} samples, step {results['step']}"
    )
    for key, _ in COLUMNS:
        table.add_column(key.replace("_", " "), justify="left" if key in ("setting", "strong", "weak") else "right")
    for row in results["rows"]:
        table.add_row(*(_cell(row, key, fmt) for key, fmt in COLUMNS))
    # Logs and CI capture stdout: give the table room instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(table)
    if results["paired"]:
        level = f"{100 * results['ci']['level']:g}%"
        pairs = Table(title=f"paired differences, same {results['num_samples']} sample indices ({level} intervals)")
        for name in ("a", "b", f"{results['metric']} a - b", f"{level} interval", "verdict"):
            pairs.add_column(name, justify="left" if name in ("a", "b", "verdict") else "right")
        for p in results["paired"]:
            verdict = {-1: "a lower", 1: "b lower", 0: "inconclusive"}[sign(p["ci"])]
            pairs.add_row(p["a"], p["b"], f"{p['diff']:+.2f}", "[{:+.2f}, {:+.2f}]".format(*p["ci"]), verdict)
        console.print(pairs)


def _cell(row: dict, key: str, fmt: str) -> str:
    """A table cell; a metric with an interval prints as ``12.34 [11.02, 13.90]``."""
    if row.get(key) is None:
        return "-"
    text = fmt.format(row[key])
    if f"{key}_ci" in row:
        text += " [{}, {}]".format(*(fmt.format(v) for v in row[f"{key}_ci"]))
    return text


def _log_to_mlflow(cfg, results: dict, out_dir: Path, run_dir: Path, tracking_uri: str, root: Path) -> str:
    """An evaluation run nested under the training run (same experiment, parentRunId tag)."""
    parent_file = run_dir / tracking.RUN_ID_FILE
    tags = {"sgexp.kind": "evaluation", "sgexp.checkpoint": results["checkpoint"]}
    if parent_file.is_file():
        tags["mlflow.parentRunId"] = parent_file.read_text().strip()
    run_id = tracking.open_run(out_dir, tracking_uri, cfg.logger.experiment, f"eval/{out_dir.name}", tags=tags)
    client = MlflowClient(tracking_uri)
    run_record.log_run_context(
        client, run_id, config=OmegaConf.to_container(cfg, resolve=True), meta=None, checkpoint_dir=None, root=root
    )
    for row in results["rows"]:
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                client.log_metric(run_id, f"{row['setting']}/{key}", float(value), step=max(results["step"], 0))
            elif key.endswith("_ci"):
                for end, bound in zip(("low", "high"), value, strict=True):
                    client.log_metric(
                        run_id, f"{row['setting']}/{key}_{end}", float(bound), step=max(results["step"], 0)
                    )
        if "grid" in row:
            client.log_artifact(run_id, row["grid"], "samples")
    for p in results["paired"]:
        values = {"diff": p["diff"], "ci_low": p["ci"][0], "ci_high": p["ci"][1]}
        for key, value in values.items():
            client.log_metric(
                run_id, f"paired/{p['a']}-{p['b']}/{p['metric']}_{key}", float(value), step=max(results["step"], 0)
            )
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
