"""The second fidelity of a study: the Pareto set re-scored on ``final_samples`` samples.

Trials are screened on ``samples_per_trial`` samples; the Pareto set is then re-scored on indices
``0..final_samples-1`` (the screening samples are its first ones: common random numbers). Optuna refuses
attributes on finished trials, so the results live in the study attribute ``final/<trial number>``;
``final_view`` returns an in-memory copy of the study whose trials carry them as ``fid_final``, ... (the
trial record of ``sgexp.sweeps.report``).
"""

from __future__ import annotations

import logging

import optuna
from omegaconf import DictConfig

from sgexp.eval.evaluator import Evaluator
from sgexp.sweeps.report import pareto_trials
from sgexp.sweeps.tracker import Tracker

log = logging.getLogger("sgexp.sweeps.fidelity")

METRICS = ("fid", "precision", "recall", "class_accuracy")


def reevaluate_pareto(
    study: optuna.Study, cfg: DictConfig, evaluator: Evaluator, tracker: Tracker | None = None
) -> list[int]:
    """Score every Pareto trial without a final result on ``final_samples`` samples; returns their numbers."""
    if not cfg.final_samples:
        return []
    done = []
    for trial in pareto_trials(study):
        if f"final/{trial.number}" in study.user_attrs:
            continue
        setting = trial.user_attrs["setting"]
        row = evaluator.score(f"trial-{trial.number}-final", setting, cfg.final_samples, cfg.seed, None, 0)
        final = {f"{k}_final": float(row[k]) for k in METRICS if k in row}
        final["num_samples_final"] = int(row["num_samples"])
        study.set_user_attr(f"final/{trial.number}", final)
        if tracker is not None:
            tracker.log_metrics(trial.user_attrs.get("mlflow_run_id"), final)
        log.info("trial %d re-evaluated on %d samples: FID %.2f", trial.number, cfg.final_samples, row["fid"])
        done.append(trial.number)
    return done


def final_view(study: optuna.Study) -> optuna.Study:
    """An in-memory copy of ``study`` whose trials carry their ``*_final`` attributes (same numbers)."""
    view = optuna.create_study(directions=study.directions, study_name=study.study_name)
    finals = {k: v for k, v in study.user_attrs.items() if k.startswith("final/")}
    for key, value in study.user_attrs.items():
        if not key.startswith("final/"):
            view.set_user_attr(key, value)
    for trial in study.get_trials(deepcopy=True):
        trial.user_attrs = {**trial.user_attrs, **finals.get(f"final/{trial.number}", {})}
        view.add_trial(trial)
    return view
