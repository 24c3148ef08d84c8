"""Report of a guidance study: which settings buy the most quality per FLOP.

A study has two minimised objectives, ``trial.values = [screening FID, GFLOPs per sample]`` (written by
``sgexp.sweeps.driver``). Only COMPLETE trials with finite values count; FAIL trials appear in
``trials.csv`` with their ``fail_reason``.

- ``pareto_trials`` / ``pareto_table``: the non-dominated settings, cheapest first.
- ``hypervolume_history``: the exact 2-D hypervolume of the front after every finished trial.
- ``write_report``: plots (PNG + interactive HTML), CSVs, (γ_strong, γ_weak) heatmaps of SG trials and, for a
  grid study, exact per-w maps of its family (``heatmaps_<family>.png``: AG+SG as in Figure 6 of the SG paper),
  and ``summary.json``, which answers the study's question: does some SG setting reach a lower
  FID than the best CFG setting at fewer GFLOPs? A paired bootstrap interval decides where the study
  records one (``paired_intervals``), the screening FIDs otherwise.

The figures themselves are drawn by ``sgexp.sweeps.plots``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from sgexp.eval.bootstrap import sign
from sgexp.run_record import log_artifact_file
from sgexp.sweeps.plots import (
    plot_grid_heatmaps,
    plot_heatmaps,
    plot_hypervolume,
    plot_pareto_html,
    plot_pareto_png,
    style,
    titles,
)

log = logging.getLogger("sgexp.sweeps.report")

TABLE_COLUMNS = tuple(
    "number family baseline scale gamma_strong gamma_weak fid fid_final fid_final_ci num_samples num_samples_final "
    "gflops_per_sample relative_to_cfg precision recall class_accuracy sfid_final sfid_final_ci "
    "inception_score_final precision_final precision_final_ci recall_final class_accuracy_final "
    "seconds_per_sample setting".split()
)  # *_final_ci: [low, high], the finalists' bootstrap intervals (``fidelity.pair_finalists``)
MIN_HEATMAP_TRIALS = 3
DEFAULT_OBJECTIVES = ("fid", "gflops_per_sample")  # trial.values, both minimised
PAIRED_ATTR = "paired"  # study attribute: paired FID intervals between trials (``paired_intervals``)


# --------------------------------------------------------------------------- front and hypervolume


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials with two finite values, by trial number."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ok = [t for t in trials if t.values is not None and len(t.values) == 2 and all(map(math.isfinite, t.values))]
    return sorted(ok, key=lambda t: t.number)


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in both objectives and better in one (equal points do not dominate)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Non-dominated COMPLETE trials on (FID, GFLOPs/sample), sorted by GFLOPs (then FID, number).

    Optuna's own front, ``study.best_trials`` (what optuna-dashboard and ``plot_pareto_front`` show), over
    trials with two finite values; trials with identical values are all kept. The driver never records a
    non-finite value (such a trial FAILs); a study written otherwise that has one gets the front of its
    finite trials computed here, since ``best_trials`` would let a ``-inf`` FID dominate finite points.
    """
    trials = _complete(study)
    if len(trials) == len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))):
        front = study.best_trials
    else:
        front = [t for t in trials if not any(_dominates(o.values, t.values) for o in trials)]
    return sorted(front, key=lambda t: (t.values[1], t.values[0], t.number))


def hypervolume_2d(points: Iterable[Sequence[float]], reference_point: Sequence[float]) -> float:
    """Exact area dominated by ``points`` (both objectives minimised) and bounded by ``reference_point``.

    Sorted by the first objective, each point that improves the best second objective seen so far adds
    the strip between the two, as wide as from its first objective to the reference. Points that are
    not strictly better than the reference in both objectives add nothing.
    """
    rx, ry = float(reference_point[0]), float(reference_point[1])
    inside = sorted((float(x), float(y)) for x, y in points if x < rx and y < ry)
    area, best_y = 0.0, ry
    for x, y in inside:
        if y < best_y:
            area += (rx - x) * (best_y - y)
            best_y = y
    return area


def default_reference_point(study: optuna.Study) -> tuple[float, float] | None:
    """1.1 × the largest FID and GFLOPs over COMPLETE trials (``None`` without any): every trial then
    adds area, the worst ones a little."""
    trials = _complete(study)
    if not trials:
        return None
    return (1.1 * max(t.values[0] for t in trials), 1.1 * max(t.values[1] for t in trials))


def hypervolume_history(
    study: optuna.Study, reference_point: tuple[float, float] | None = None
) -> list[tuple[int, float]]:
    """``(trial number, hypervolume)`` after each finished trial (COMPLETE, FAIL, PRUNED), by number.

    A FAIL trial repeats the previous value, so the curve reads against the trials actually spent.
    The default reference is ``default_reference_point``; with no COMPLETE trial every value is 0.
    """
    ref = reference_point if reference_point is not None else default_reference_point(study)
    complete = {t.number: t.values for t in _complete(study)}
    finished = sorted(t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished())
    front: list[Sequence[float]] = []  # only the non-dominated points so far: keeps the sweep short
    history = []
    for number in finished:
        values = complete.get(number)
        if values is not None and not any(_dominates(p, values) or tuple(p) == tuple(values) for p in front):
            front = [p for p in front if not _dominates(values, p)] + [values]
        history.append((number, hypervolume_2d(front, ref) if ref is not None else 0.0))
    return history


# --------------------------------------------------------------------------- tables


def _attr(trial: FrozenTrial, key: str) -> Any:
    """A user attribute, else the sampled parameter of that name, else the field of ``setting``."""
    if key in trial.user_attrs:
        return trial.user_attrs[key]
    if key in trial.params:
        return trial.params[key]
    setting = trial.user_attrs.get("setting")
    return setting.get(key) if isinstance(setting, dict) else None


def _row(trial: FrozenTrial) -> dict[str, Any]:
    """One table row; the FID and GFLOPs are the objective values (what the study optimised)."""
    row: dict[str, Any] = {key: trial.user_attrs.get(key) for key in TABLE_COLUMNS}
    row.update(
        number=trial.number,
        family=str(trial.user_attrs.get("family", "unknown")),
        baseline=bool(trial.user_attrs.get("baseline", False)),
        scale=_attr(trial, "scale"),
        gamma_strong=_attr(trial, "gamma_strong"),
        gamma_weak=_attr(trial, "gamma_weak"),
        fid=float(trial.values[0]),
        gflops_per_sample=float(trial.values[1]),
    )
    return row


def pareto_table(study: optuna.Study) -> list[dict]:
    """One row per Pareto trial (``TABLE_COLUMNS``), cheapest first; missing optional attrs are ``None``."""
    return [_row(t) for t in pareto_trials(study)]


def _cell(value: Any) -> Any:
    """CSV cell: dicts and lists as JSON, ``None`` empty; floats keep ``repr`` (exact round trip)."""
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True) if isinstance(value, dict | list | tuple) else value


def _write_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c)) for c in columns} for r in rows)
    return path


def _trials_rows(study: optuna.Study) -> tuple[list[dict], list[str]]:
    """Every trial, any state: objectives, params as ``param.*``, user attributes as ``attr.*``."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        values, start, end = list(t.values or [None, None]), t.datetime_start, t.datetime_complete
        row = {
            "number": t.number,
            "state": t.state.name,
            "fid": values[0],
            "gflops_per_sample": values[-1],
            "datetime_start": start and start.isoformat(),
            "duration_s": (end - start).total_seconds() if start and end else None,
            "fail_reason": t.user_attrs.get("fail_reason"),
        }
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row | {f"attr.{k}": v for k, v in t.user_attrs.items() if k != "fail_reason"})
    head = ["number", "state", "fid", "gflops_per_sample", "datetime_start", "duration_s", "fail_reason"]
    extra = {k for r in rows for k in r if k.startswith(("param.", "attr."))}
    return rows, head + sorted(extra, key=lambda k: (k.startswith("attr."), k))  # params first


# --------------------------------------------------------------------------- the study's question


def paired_intervals(study: optuna.Study) -> dict[tuple[int, int], dict]:
    """``{(a, b): {"diff", "ci"}}`` from the study attribute ``PAIRED_ATTR``, in both orientations.

    The attribute is a list of entries as ``sgexp.evaluate`` writes them under ``paired`` in results.json
    (``a``, ``b`` trial numbers, ``diff`` = FID(a) − FID(b), ``ci`` its paired bootstrap interval,
    ``sgexp.eval.bootstrap``): trials are scored on the same sample indices, so such an interval can be
    computed whenever both trials' features are at hand. Empty when the study records none."""
    out = {}
    for p in study.user_attrs.get(PAIRED_ATTR) or []:
        if p.get("metric", "fid") == "fid":
            a, b, (lo, hi) = int(p["a"]), int(p["b"]), p["ci"]
            out[a, b] = {"diff": p["diff"], "ci": [lo, hi]}
            out[b, a] = {"diff": -p["diff"], "ci": [-hi, -lo]}
    return out


def versus(row: dict, other: dict, paired: dict[tuple[int, int], dict]) -> tuple[str, str]:
    """``row`` against ``other`` on FID: ("better" | "worse" | "inconclusive", what decided).

    A paired interval of FID(row) − FID(other) decides when there is one (it excludes 0, or the
    comparison is inconclusive); otherwise the screening FIDs themselves (every trial has one)."""
    entry = paired.get((row["number"], other["number"]))
    if entry is not None:
        return {-1: "better", 1: "worse", 0: "inconclusive"}[sign(entry["ci"])], "paired interval"
    return ("better" if row["fid"] < other["fid"] else "worse"), "point estimate"


def compare_to_best_cfg(
    rows: list[dict], family: str = "sg", paired: dict[tuple[int, int], dict] | None = None
) -> dict[str, Any]:
    """Is some ``family`` point better than the best CFG point (lowest screening FID) in FID at fewer
    GFLOPs? ``versus`` decides each cheaper point: by its paired interval against the best CFG point
    where ``paired`` (``paired_intervals``) has one, else by the screening FIDs. When both points were
    re-evaluated, ``confirmed_with_final_fid`` says whether the final FIDs agree. ``answer`` is ``None``
    (with a ``reason``) when there is no CFG or no ``family`` trial to compare."""
    cfg = [r for r in rows if r["family"] == "cfg"]
    candidates = [r for r in rows if r["family"] == family]
    out: dict[str, Any] = {"family": family, "fid": "screening", "answer": None, "best_cfg": None, "point": None}
    if not cfg or not candidates:
        out["reason"] = f"no COMPLETE {'CFG' if not cfg else style(family).label} trial to compare"
        return out
    best_cfg = min(cfg, key=lambda r: (r["fid"], r["gflops_per_sample"], r["number"]))
    cheaper = [r for r in candidates if r["gflops_per_sample"] < best_cfg["gflops_per_sample"]]
    decided = [(r, *versus(r, best_cfg, paired or {})) for r in cheaper]
    winners = [r for r, verdict, _ in decided if verdict == "better"]
    point = min(winners, key=lambda r: (r["fid"], r["gflops_per_sample"], r["number"])) if winners else None
    confirmed = None
    if point is not None and point["fid_final"] is not None and best_cfg["fid_final"] is not None:
        confirmed = bool(point["fid_final"] < best_cfg["fid_final"])
    out.update(answer=bool(winners), best_cfg=best_cfg, point=point, n_candidates=len(candidates))
    out.update(n_better=len(winners), confirmed_with_final_fid=confirmed)
    out["n_inconclusive"] = sum(verdict == "inconclusive" for _, verdict, _ in decided)
    out["decided_by"] = sorted({how for _, _, how in decided})  # "paired interval", "point estimate"
    if point is not None:
        out["point_paired"] = (paired or {}).get((point["number"], best_cfg["number"]))
    return out


# --------------------------------------------------------------------------- the report


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats become ``null`` (``json`` would write invalid ``NaN``)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value if value is None or isinstance(value, bool | int | str) else str(value)


def write_report(
    study: optuna.Study, out_dir: Path, tracking_uri: str | None = None, parent_run_id: str | None = None
) -> dict[str, Path]:
    """Write the report files into ``out_dir``; returns ``{file name: path}``.

    Files: ``pareto.png``, ``pareto.html``, ``pareto.csv``, ``trials.csv``, ``hypervolume.csv``,
    ``hypervolume.png``, ``heatmaps.png`` (only with at least ``MIN_HEATMAP_TRIALS`` SG trials that have
    ``scale``/``gamma_strong``/``gamma_weak``; a stale one is removed and ``summary.json`` notes why),
    ``heatmaps_<family>.png`` for a grid study (``optuna.sampler: grid``) and ``summary.json``. With both
    ``tracking_uri`` and ``parent_run_id`` every file is also logged as an artifact of that MLflow run under
    ``report/`` (a later call overwrites them). Safe to call on a study without any COMPLETE trial.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_row(t) for t in _complete(study)]
    front = pareto_table(study)
    ref = default_reference_point(study)
    history = hypervolume_history(study, ref)
    families = sorted({r["family"] for r in rows if r["family"] != "cfg"} | {"sg"})
    paired = paired_intervals(study)
    answers = {family: compare_to_best_cfg(rows, family, paired) for family in families}
    best_cfg = answers["sg"]["best_cfg"]
    notes: list[str] = []
    config = study.user_attrs.get("config")
    config = config if isinstance(config, dict) else None
    objectives = list((config or {}).get("objectives") or DEFAULT_OBJECTIVES)
    if objectives != list(DEFAULT_OBJECTIVES):  # the driver allows others; this report reads values as FID, GFLOPs
        notes.append(f"objectives are {objectives}: what this report calls FID and GFLOPs are values[0] and values[1]")

    files = {
        "pareto.png": plot_pareto_png(study, rows, front, best_cfg, out_dir / "pareto.png"),
        "pareto.html": plot_pareto_html(study, rows, front, best_cfg, out_dir / "pareto.html"),
        "pareto.csv": _write_csv(out_dir / "pareto.csv", front, TABLE_COLUMNS),
        "trials.csv": _write_csv(out_dir / "trials.csv", *_trials_rows(study)),
    }
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    hv_rows = [{"number": n, "state": states[n], "hypervolume": v} for n, v in history]
    files["hypervolume.csv"] = _write_csv(out_dir / "hypervolume.csv", hv_rows, ["number", "state", "hypervolume"])
    files["hypervolume.png"] = plot_hypervolume(history, ref, out_dir / "hypervolume.png")
    keys = ("scale", "gamma_strong", "gamma_weak")
    sg = [r for r in rows if r["family"] == "sg" and all(r[k] is not None for k in keys)]
    if len(sg) >= MIN_HEATMAP_TRIALS:
        files["heatmaps.png"] = plot_heatmaps(study, sg, out_dir / "heatmaps.png")
    else:
        (out_dir / "heatmaps.png").unlink(missing_ok=True)
        notes.append(f"heatmaps.png skipped: {len(sg)} COMPLETE SG trial(s) with w and γ's, need {MIN_HEATMAP_TRIALS}")
    if ((config or {}).get("optuna") or {}).get("sampler") == "grid":
        for family in config.get("family") or []:
            on_grid = [r for r in rows if r["family"] == family and all(r[k] is not None for k in keys)]
            name = f"heatmaps_{family}.png"
            if on_grid:
                files[name] = plot_grid_heatmaps(study, on_grid, family, out_dir / name)
            else:
                notes.append(f"{name} skipped: no COMPLETE {style(family).label} trial yet")

    metric, screening, final = titles(study)
    summary = {
        "study": study.study_name,
        "metric": metric,
        "objectives": objectives,
        "fid_screening": screening,
        "fid_final": final,
        "checkpoint": study.user_attrs.get("checkpoint"),
        "mlflow_parent_run_id": study.user_attrs.get("mlflow_parent_run_id", parent_run_id),
        "n_trials": len(states),
        "n_trials_by_state": dict(sorted(Counter(states.values()).items())),
        "hypervolume": {"reference_point": ref, "final": history[-1][1] if history else 0.0},
        "pareto": front,
        "best_cfg": best_cfg,
        "sg_beats_best_cfg": answers["sg"],  # the study's question
        "vs_best_cfg": answers,  # the same question for every other family
        "notes": notes,
        "files": sorted([*files, "summary.json"]),
    }
    files["summary.json"] = out_dir / "summary.json"
    files["summary.json"].write_text(json.dumps(_jsonable(summary), indent=2, ensure_ascii=False) + "\n")
    for note in notes:
        log.info(note)

    if tracking_uri and parent_run_id:
        client = MlflowClient(tracking_uri=tracking_uri)
        for path in files.values():
            log_artifact_file(client, path, "report", run_id=parent_run_id)
    return files
