"""The second fidelity of a study: the finalists re-scored on ``final_samples`` samples, with paired intervals.

Trials are screened on ``samples_per_trial`` samples. The finalists, the Pareto set and the best CFG
trial (the yardstick of the study's question, ``report.compare_to_best_cfg``), are then re-scored on
indices ``0..final_samples-1`` (the screening samples are its first ones: common random numbers).
Because every finalist is scored on the same indices, the FID difference of any two of them gets a
*paired* bootstrap interval (``sgexp.eval.bootstrap``): the study attribute ``paired``, which
``report.paired_intervals`` reads and the summary's verdicts use.

Optuna refuses attributes on finished trials, so the results live in study attributes:
``final/<trial number>`` (``fid_final``, ``fid_final_ci``, ``sfid_final_ci`` with the ADM extractor,
``precision_final_ci``, ...) and ``paired`` (FID and, with the ADM extractor, sFID). The features a finalist
was scored on are kept in ``<sweep dir>/final_features/trial-<n>.npy`` (and ``trial-<n>.sfid.npy``), so that
a resumed or extended study pairs new finalists with old ones without sampling again. ``final_view``
returns an in-memory copy of the study whose trials carry their final results (the trial record of
``sgexp.sweeps.report``).
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
from sgexp.eval.metrics import ReferenceStats
from sgexp.sweeps.report import PAIRED_ATTR, pareto_trials
from sgexp.sweeps.tracker import Tracker

log = logging.getLogger("sgexp.sweeps.fidelity")

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy")
INTERVAL_METRICS = ("fid", "sfid", "precision")  # what ``compare_settings`` gives intervals for
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


def feature_file(features_dir: Path, number: int, metric: str) -> Path:
    """Where a finalist's features for a Fréchet metric are kept (``fid``: pool3, ``sfid``: spatial)."""
    return features_dir / (f"trial-{number}.npy" if metric == "fid" else f"trial-{number}.{metric}.npy")


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
            for metric, array in features.items():  # "fid" always, "sfid" with the ADM extractor
                _save(feature_file(features_dir, trial.number, metric), array)
        final = {f"{k}_final": float(row[k]) for k in METRICS if k in row}
        final["num_samples_final"] = int(row["num_samples"])
        study.set_user_attr(key, final)
        if tracker is not None:
            tracker.log_metrics(trial.user_attrs.get("mlflow_run_id"), final)
        log.info("trial %d re-evaluated on %d samples: FID %.2f", trial.number, cfg.final_samples, row["fid"])
        done.append(trial.number)
    if features_dir is not None and cfg.get("bootstrap", 1000):
        pair_finalists(study, cfg, evaluator.reference, features_dir, tracker)
    return done


def pair_finalists(
    study: optuna.Study,
    cfg: DictConfig,
    reference: ReferenceStats,
    features_dir: Path,
    tracker: Tracker | None = None,
) -> None:
    """``fid_final_ci`` (and ``sfid_final_ci``, ``precision_final_ci``) of every finalist and the study
    attribute ``paired``: FID(a) − FID(b) (and sFID) with its paired interval for every two finalists scored
    on the same ``final_samples`` indices (features kept on disk). With ``tracker``, each finalist's run
    gets its intervals (``eval/<family>/fid_final_ci_low``, ...) and the parent run the paired differences
    (``eval/paired/trial-<a>-trial-<b>/fid_diff``, ...)."""
    features, rows, runs = {}, {}, {}
    for trial in finalists(study):
        final = study.user_attrs.get(f"final/{trial.number}")
        path = feature_file(features_dir, trial.number, "fid")
        if final and final.get("num_samples_final") == cfg.final_samples and path.is_file():
            features[trial.number] = {"fid": np.load(path)}
            spatial = feature_file(features_dir, trial.number, "sfid")
            if spatial.is_file() and "sfid_final" in final:
                features[trial.number]["sfid"] = np.load(spatial)
            rows[trial.number] = {m: final.get(f"{m}_final", float("nan")) for m in INTERVAL_METRICS}
            runs[trial.number] = trial.user_attrs.get("mlflow_run_id")
    if len(features) < 1:
        return
    level = cfg.get("ci_level", 0.95)
    cis, paired = compare_settings(features, rows, reference, cfg.get("bootstrap", 1000), level, cfg.seed)
    for number, ci in cis.items():
        final = dict(study.user_attrs[f"final/{number}"])
        intervals = {f"{k.removesuffix('_ci')}_final_ci": v for k, v in ci.items()}
        final.update(intervals)
        study.set_user_attr(f"final/{number}", final)
        if tracker is not None:
            tracker.log_metrics(runs[number], intervals)
    for entry in paired:
        entry.update(a=int(entry["a"]), b=int(entry["b"]), num_samples=cfg.final_samples, level=level)
    study.set_user_attr(PAIRED_ATTR, paired)
    if tracker is not None:
        tracker.log_paired(paired)
    metrics = sorted({p["metric"] for p in paired}) or ["fid"]
    log.info("paired %s intervals of %d finalists on %d samples", "/".join(metrics), len(features), cfg.final_samples)


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
