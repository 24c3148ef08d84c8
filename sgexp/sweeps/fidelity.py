"""The second fidelity of a study: the finalists re-scored on ``final_samples`` samples, with paired intervals.

Trials are screened on ``samples_per_trial`` samples. The finalists, the Pareto set and the best CFG
trial (the yardstick of the study's question, ``report.compare_to_best_cfg``), are then re-scored on
indices ``0..final_samples-1`` (the screening samples are its first ones: common random numbers).
Because every finalist is scored on the same indices, the FID difference of any two of them gets a
*paired* bootstrap interval (``sgexp.eval.bootstrap``): the study attribute ``paired``, which
``report.paired_intervals`` reads and the summary's verdicts use.

Optuna refuses attributes on finished trials, so the results live in study attributes:
``final/<trial number>`` (``fid_final``, ``fid_final_ci``, ...) and ``paired``. The features a finalist
was scored on are kept in ``<sweep dir>/final_features/trial-<n>.npy``, so that a resumed or extended
study pairs new finalists with old ones without sampling again. ``final_view`` returns an in-memory
copy of the study whose trials carry their final results (the trial record of ``sgexp.sweeps.report``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import optuna
from omegaconf import DictConfig

from sgexp.eval.bootstrap import compare_settings
from sgexp.eval.evaluator import Evaluator
from sgexp.sweeps.report import PAIRED_ATTR, pareto_trials
from sgexp.sweeps.tracker import Tracker

log = logging.getLogger("sgexp.sweeps.fidelity")

METRICS = ("fid", "precision", "recall", "class_accuracy")
FEATURES_DIR = "final_features"


def finalists(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto trials and the best CFG trial by screening FID (if not already among them), by number."""
    chosen = {t.number: t for t in pareto_trials(study)}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    cfg = [t for t in complete if t.user_attrs.get("family") == "cfg"]
    if cfg:
        best = min(cfg, key=lambda t: (t.values[0], t.values[1], t.number))
        chosen.setdefault(best.number, best)
    return [chosen[n] for n in sorted(chosen)]


def _save(path: Path, features: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")  # atomic: a crash never leaves half a file
    np.save(tmp, features)
    os.replace(tmp, path)


def reevaluate_pareto(
    study: optuna.Study,
    cfg: DictConfig,
    evaluator: Evaluator,
    tracker: Tracker | None = None,
    out_dir: Path | None = None,
    progress=None,
) -> list[int]:
    """Score every finalist without a final result on ``final_samples`` samples, then (with ``out_dir``,
    where the features are kept, and ``cfg.bootstrap`` > 0) the paired FID intervals of all finalists
    whose features are at hand. Returns the numbers of the trials scored now. ``progress``: the driver's
    view (``sgexp.sweeps.progress.LiveProgress``), which then shows each pass; else each shows its own."""
    if not cfg.final_samples:
        return []
    features_dir = Path(out_dir) / FEATURES_DIR if out_dir is not None else None
    done = []
    todo = [t for t in finalists(study) if f"final/{t.number}" not in study.user_attrs]
    for k, trial in enumerate(todo):
        key = f"final/{trial.number}"
        setting = trial.user_attrs["setting"]
        shown = contextlib.nullcontext()
        if progress is not None:
            name = f"final {k + 1}/{len(todo)}: trial {trial.number}"
            shown = progress.track(study, name, cfg.final_samples, passes_after=len(todo) - k - 1)
        with shown as advance:
            row, features = evaluator.score_with_features(
                f"trial-{trial.number}-final", setting, cfg.final_samples, cfg.seed, None, 0, advance
            )
        if features_dir is not None:
            _save(features_dir / f"trial-{trial.number}.npy", features["fid"])
        final = {f"{k}_final": float(row[k]) for k in METRICS if k in row}
        final["num_samples_final"] = int(row["num_samples"])
        study.set_user_attr(key, final)
        if tracker is not None:
            tracker.log_metrics(trial.user_attrs.get("mlflow_run_id"), final)
        log.info("trial %d re-evaluated on %d samples: FID %.2f", trial.number, cfg.final_samples, row["fid"])
        done.append(trial.number)
    if features_dir is not None and cfg.get("bootstrap", 1000):
        pair_finalists(study, cfg, evaluator, features_dir)
    return done


def pair_finalists(study: optuna.Study, cfg: DictConfig, evaluator: Evaluator, features_dir: Path) -> None:
    """``fid_final_ci`` of every finalist and the study attribute ``paired``: FID(a) − FID(b) with its paired
    interval for every two finalists scored on the same ``final_samples`` indices (features kept on disk)."""
    features, rows = {}, {}
    for trial in finalists(study):
        final = study.user_attrs.get(f"final/{trial.number}")
        path = features_dir / f"trial-{trial.number}.npy"
        if final and final.get("num_samples_final") == cfg.final_samples and path.is_file():
            features[trial.number] = {"fid": np.load(path)}
            rows[trial.number] = {"fid": final["fid_final"], "precision": final.get("precision_final", float("nan"))}
    if len(features) < 1:
        return
    level = cfg.get("ci_level", 0.95)
    cis, paired = compare_settings(features, rows, evaluator.reference, cfg.get("bootstrap", 1000), level, cfg.seed)
    for number, ci in cis.items():
        final = dict(study.user_attrs[f"final/{number}"])
        final.update({f"{k.removesuffix('_ci')}_final_ci": v for k, v in ci.items()})
        study.set_user_attr(f"final/{number}", final)
    for entry in paired:
        entry.update(a=int(entry["a"]), b=int(entry["b"]), num_samples=cfg.final_samples, level=level)
    study.set_user_attr(PAIRED_ATTR, paired)
    log.info("paired FID intervals of %d finalists on %d samples", len(features), cfg.final_samples)


def final_view(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` whose trials carry their ``*_final`` attributes (same numbers)."""
    view = optuna.create_study(directions=study.directions, study_name=study.study_name)
    if study.metric_names:
        view.set_metric_names(study.metric_names)
    finals = {k: v for k, v in study.user_attrs.items() if k.startswith("final/")}
    for key, value in study.user_attrs.items():
        if not key.startswith("final/"):
            view.set_user_attr(key, value)
    for trial in study.get_trials(deepcopy=True):
        trial.user_attrs = {**trial.user_attrs, **finals.get(f"final/{trial.number}", {})}
        view.add_trial(trial)
    return view
