"""Read the outputs of finished stages into one record of numbers (``collect``).

Stages that have not finished are simply missing from the record, so a report can be written at
any time and says what is still pending.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from reproduce.runner import is_done, marker
from reproduce.stages import MODELS, Paths, Preset, Stage, rel
from sgexp.flops import gflops_per_pass
from sgexp.models.dit import DiTConfig
from sgexp.runs import checkpoint_step, open_checkpoint

ROW_KEYS = (
    "fid",
    "fid_ci",
    "precision",
    "precision_ci",
    "recall",
    "class_accuracy",
    "gflops_per_sample",
    "gflops_per_sample_unshared",  # every pass counted in full, the paper's convention
    "relative_to_cfg",
)
ROW_KEYS += ("seconds_per_sample", "num_samples", "grid")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _rows(stage: Stage) -> dict[str, dict]:
    """The evaluation rows of a stage by setting name, with the setting's own numbers added."""
    results = json.loads(stage.output.read_text())
    out = {}
    for row in results["rows"]:
        setting = stage.info.get("settings", {}).get(row["setting"], {})
        out[row["setting"]] = {
            "setting": row["setting"],
            "rule": row["rule"],
            "scale": float(row["scale"]),
            "gamma_strong": _number(setting.get("gamma_strong", 0)),
            "gamma_weak": _number(setting.get("gamma_weak", 0)),
            "step": results["step"],
            "metric": results["metric"],
            **{k: row.get(k) for k in ROW_KEYS},
        }
    for p in results.get("paired", []):  # paired bootstrap intervals of a − b on the same sample indices
        if p["a"] in out and p["b"] in out:
            out[p["a"]].setdefault("paired", {})[p["b"]] = {"diff": p["diff"], "ci": p["ci"]}
            out[p["b"]].setdefault("paired", {})[p["a"]] = {"diff": -p["diff"], "ci": [-p["ci"][1], -p["ci"][0]]}
    return out


def _training(stage: Stage, state_dir: Path) -> dict:
    """Steps, wall seconds and the analytic forward GFLOPs per training image of a finished training,
    read from its checkpoint's stored network and run config (tensors memory-mapped, not read)."""
    checkpoint = open_checkpoint(stage.output)
    config = DiTConfig.from_dict(dict(checkpoint["hyper_parameters"]["model"]))
    run = checkpoint["sgexp_config"]
    sparsity = [r.sparsity for r in config.routes] if config.routes else 0.0
    seconds = json.loads(marker(state_dir, stage.name).read_text())["seconds"]
    return {
        "model": stage.info["model"],
        "steps": stage.info["steps"],
        "seconds": seconds,
        "seconds_per_step": seconds / stage.info["steps"],
        "train_gflops_per_image": gflops_per_pass(config, sparsity),  # forward pass at γ_train
        "routes": [f"{r.start}:{r.end}@{r.sparsity:g}" for r in config.routes],
        "prefix_blocks": min((r.start for r in config.routes), default=config.depth),  # dense before any route
        "depth": config.depth,
        "width": config.hidden_size,
        "tokens": config.num_tokens,
        "model_name": run["model"]["name"],
        "batch_size": int(run["data"]["batch_size"]),
        "resolution": config.input_size,
    }


def training_step(run_dir: Path) -> int | None:
    """The step of a training's last checkpoint (written every few steps), None before the first."""
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    return checkpoint_step(ckpt) if ckpt.is_file() else None


def collect(preset: Preset, paths: Paths, stages: list[Stage]) -> dict:
    """Every number the report uses; keys are missing where their stage has not finished."""
    state = paths.work / "stages"
    done = {s.name: s for s in stages if is_done(state, s.name)}
    out: dict[str, Any] = {"preset": preset.to_dict(), "pending": [s.name for s in stages if s.name not in done]}
    out["seconds"] = {n: json.loads(marker(state, n).read_text())["seconds"] for n in done}
    out["commands"] = {s.name: s.shell(fresh=True) for s in stages}
    trainings = [m for m in MODELS if f"train_{m}" not in done]
    out["progress"] = {f"train_{m}": training_step(paths.run_dir(m)) for m in trainings}
    out["training"] = {m: _training(done[f"train_{m}"], state) for m in MODELS if f"train_{m}" in done}
    out["guidance"] = _rows(done["guidance"]) if "guidance" in done else {}
    out["curve"] = {m: [] for m in MODELS}
    out["final"] = {}
    for stage in stages:
        if stage.name.startswith("curve_") and stage.name in done:
            row = {**_rows(stage)["none"], "step": stage.info["step"]}
            out["curve"][stage.info["model"]].append(row)
            if row["step"] == preset.steps:
                out["final"][stage.info["model"]] = row
    out["heatmaps"] = {}
    for stage in stages:
        if stage.name.startswith("heatmap_") and stage.name in done:
            out["heatmaps"][stage.info["scale"]] = list(_rows(stage).values())
    if "sweep" in done:
        report = done["sweep"].output.parent
        out["sweep"] = {
            "summary": json.loads(done["sweep"].output.read_text()),
            "pareto_png": rel(report / "pareto.png"),
            "trials_csv": rel(report / "trials.csv"),
        }
    return out
