"""Report of a guidance study: which settings buy the most quality per FLOP.

A study has two minimised objectives, ``trial.values = [screening FID, GFLOPs per sample]`` (written by
``sgexp.sweeps.driver``). Only COMPLETE trials with finite values count; FAIL trials appear in
``trials.csv`` with their ``fail_reason``.

- ``pareto_trials`` / ``pareto_table``: the non-dominated settings, cheapest first.
- ``hypervolume_history``: the exact 2-D hypervolume of the front after every finished trial.
- ``write_report``: plots (PNG + interactive HTML), CSVs, (γ_strong, γ_weak) heatmaps like Figure 6 of the
  SG paper, and ``summary.json``, which answers the study's question: does some SG setting reach a lower
  FID than the best CFG setting at fewer GFLOPs?

Plots use matplotlib's ``Figure`` with the Agg canvas directly, never pyplot: nothing process-wide (the
pyplot backend, its figure registry) is touched, so the driver can call this after every batch.
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
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger("sgexp.sweeps.report")

# family -> (label, matplotlib marker, colour, plotly symbol); colours are matplotlib's tab10 as hex,
# which both libraries accept.
FAMILY_STYLE: dict[str, tuple[str, str, str, str]] = {
    "none": ("unguided", "X", "#000000", "x"),
    "cfg": ("CFG", "o", "#1f77b4", "circle"),
    "sg": ("SG", "^", "#ff7f0e", "triangle-up"),
    "cfg_sg": ("CFG+SG", "s", "#2ca02c", "square"),
    "ag": ("AutoGuidance", "D", "#9467bd", "diamond"),
    "ag_sg": ("AG+SG", "P", "#8c564b", "cross"),
}
TABLE_COLUMNS = (
    "number", "family", "baseline", "scale", "gamma_strong", "gamma_weak", "fid", "fid_final", "num_samples",
    "num_samples_final", "gflops_per_sample", "relative_to_cfg", "precision", "recall", "class_accuracy",
    "precision_final", "recall_final", "class_accuracy_final", "seconds_per_sample", "setting",
)  # fmt: skip
HEATMAP_BINS, HEATMAP_LIMIT, MIN_HEATMAP_TRIALS = 6, 0.95, 3
DEFAULT_OBJECTIVES = ("fid", "gflops_per_sample")  # trial.values, both minimised


def _style(family: str) -> tuple[str, str, str, str]:
    return FAMILY_STYLE.get(family, (str(family), "v", "#7f7f7f", "triangle-down"))


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

    Trials with identical values are all kept, as in ``study.best_trials``.
    """
    trials = _complete(study)
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
            "number": t.number, "state": t.state.name, "fid": values[0], "gflops_per_sample": values[-1],
            "datetime_start": start and start.isoformat(),
            "duration_s": (end - start).total_seconds() if start and end else None,
            "fail_reason": t.user_attrs.get("fail_reason"),
        }  # fmt: skip
        row.update({f"param.{k}": v for k, v in t.params.items()})
        rows.append(row | {f"attr.{k}": v for k, v in t.user_attrs.items() if k != "fail_reason"})
    head = ["number", "state", "fid", "gflops_per_sample", "datetime_start", "duration_s", "fail_reason"]
    extra = {k for r in rows for k in r if k.startswith(("param.", "attr."))}
    return rows, head + sorted(extra, key=lambda k: (k.startswith("attr."), k))  # params first


# --------------------------------------------------------------------------- the study's question


def compare_to_best_cfg(rows: list[dict], family: str = "sg") -> dict[str, Any]:
    """Is some ``family`` point strictly better than the best CFG point (lowest screening FID) in both FID
    and GFLOPs? Screening FIDs decide, since every trial has one; when both points were re-evaluated,
    ``confirmed_with_final_fid`` says whether the final FIDs agree. ``answer`` is ``None`` (with a
    ``reason``) when there is no CFG or no ``family`` trial to compare."""
    cfg = [r for r in rows if r["family"] == "cfg"]
    candidates = [r for r in rows if r["family"] == family]
    out: dict[str, Any] = {"family": family, "fid": "screening", "answer": None, "best_cfg": None, "point": None}
    if not cfg or not candidates:
        out["reason"] = f"no COMPLETE {'CFG' if not cfg else _style(family)[0]} trial to compare"
        return out
    best_cfg = min(cfg, key=lambda r: (r["fid"], r["gflops_per_sample"], r["number"]))
    winners = [
        r for r in candidates if r["fid"] < best_cfg["fid"] and r["gflops_per_sample"] < best_cfg["gflops_per_sample"]
    ]
    point = min(winners, key=lambda r: (r["fid"], r["gflops_per_sample"], r["number"])) if winners else None
    confirmed = None
    if point is not None and point["fid_final"] is not None and best_cfg["fid_final"] is not None:
        confirmed = bool(point["fid_final"] < best_cfg["fid_final"])
    out.update(answer=bool(winners), best_cfg=best_cfg, point=point, n_candidates=len(candidates))
    out.update(n_better=len(winners), confirmed_with_final_fid=confirmed)
    return out


# --------------------------------------------------------------------------- plots


def _label(row: dict) -> str:
    label = _style(row["family"])[0]
    if row["family"] != "none" and row["scale"] is not None:
        label += f" w={row['scale']:g}"
    if row["gamma_strong"] is not None and row["gamma_weak"] is not None and "sg" in row["family"]:
        label += f" γ={row['gamma_strong']:g}/{row['gamma_weak']:g}"
    return label


def _hover(row: dict) -> str:
    lines = [f"trial {row['number']}: {_label(row)}" + (" (baseline)" if row["baseline"] else "")]
    lines.append(f"screening FID {row['fid']:.2f} ({row['num_samples'] or '?'} samples)")
    if row["fid_final"] is not None:
        lines.append(f"final FID {row['fid_final']:.2f} ({row['num_samples_final'] or '?'} samples)")
    rel = f" = {row['relative_to_cfg']:.3f}× CFG" if row["relative_to_cfg"] is not None else ""
    lines.append(f"{row['gflops_per_sample']:.4g} GFLOPs/sample{rel}")
    if row["setting"] is not None:
        lines.append("setting: " + json.dumps(row["setting"], sort_keys=True))
    return "<br>".join(lines)


def _titles(study: optuna.Study) -> tuple[str, str, str]:
    """(metric, screening description, final description) from the study's user attributes."""
    attrs = study.user_attrs
    screening, final = attrs.get("samples_per_trial", "?"), attrs.get("final_samples", "?")
    return str(attrs.get("metric", "FID")), f"screening, {screening} samples", f"final, {final} samples"


def _figure(size: tuple[float, float]):
    """A matplotlib figure on an Agg canvas of its own: no pyplot, no process-wide backend or registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot_pareto_png(study: optuna.Study, rows: list[dict], front: list[dict], best_cfg: dict | None, path: Path):
    metric, screening, final = _titles(study)
    fig = _figure((9, 6))
    ax = fig.subplots()
    for family in sorted({r["family"] for r in rows}):
        label, marker, colour, _ = _style(family)
        pts = [r for r in rows if r["family"] == family]
        ax.scatter([r["gflops_per_sample"] for r in pts], [r["fid"] for r in pts], marker=marker, color=colour,
                   s=40, alpha=0.8, label=f"{label} ({len(pts)})", zorder=3)  # fmt: skip
        finals = [r for r in pts if r["fid_final"] is not None]
        for r in finals:  # screening -> final: how much the screening FID moved with more samples
            ax.plot([r["gflops_per_sample"]] * 2, [r["fid"], r["fid_final"]], color=colour, lw=0.8, ls=":")
        if finals:
            ax.scatter([r["gflops_per_sample"] for r in finals], [r["fid_final"] for r in finals], marker=marker,
                       facecolors="none", edgecolors=colour, s=90, label=f"{label} ({final})", zorder=4)  # fmt: skip
        for r in pts:
            if r["baseline"]:
                ax.annotate(_label(r), (r["gflops_per_sample"], r["fid"]), textcoords="offset points",
                            xytext=(6, 6), fontsize=8)  # fmt: skip
    if front:
        ax.step([r["gflops_per_sample"] for r in front], [r["fid"] for r in front], where="post", color="crimson",
                lw=1.5, label=f"Pareto front ({screening})", zorder=2)  # fmt: skip
    if best_cfg is not None:  # the lower-left quadrant of these lines is where a setting beats the best CFG
        text = f"best CFG: FID {best_cfg['fid']:.2f} at {best_cfg['gflops_per_sample']:.4g} GFLOPs"
        ax.axhline(best_cfg["fid"], color="#1f77b4", ls="--", lw=0.8, label=text)
        ax.axvline(best_cfg["gflops_per_sample"], color="#1f77b4", ls="--", lw=0.8)
    if rows:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no COMPLETE trials yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("GFLOPs per sample (all sampling steps)")
    ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(f"{study.study_name}: {metric} vs cost\nfilled: {screening}; hollow: re-evaluated ({final})")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # baseline labels may stick out
    return path


def _plot_pareto_html(study: optuna.Study, rows: list[dict], front: list[dict], best_cfg: dict | None, path: Path):
    import plotly.graph_objects as go

    metric, screening, final = _titles(study)
    fig = go.Figure()
    for family in sorted({r["family"] for r in rows}):
        label, _, colour, symbol = _style(family)
        pts = [r for r in rows if r["family"] == family]
        fig.add_trace(go.Scatter(
            x=[r["gflops_per_sample"] for r in pts], y=[r["fid"] for r in pts], mode="markers+text",
            name=f"{label} ({screening})", marker=dict(symbol=symbol, color=colour, size=9),
            text=[_label(r) if r["baseline"] else "" for r in pts], textposition="top right",
            hovertext=[_hover(r) for r in pts], hoverinfo="text",
        ))  # fmt: skip
        finals = [r for r in pts if r["fid_final"] is not None]
        if finals:
            fig.add_trace(go.Scatter(
                x=[r["gflops_per_sample"] for r in finals], y=[r["fid_final"] for r in finals], mode="markers",
                name=f"{label} ({final})", marker=dict(symbol=f"{symbol}-open", color=colour, size=13),
                hovertext=[_hover(r) for r in finals], hoverinfo="text",
            ))  # fmt: skip
    if front:
        fig.add_trace(go.Scatter(
            x=[r["gflops_per_sample"] for r in front], y=[r["fid"] for r in front], mode="lines",
            line=dict(shape="hv", color="crimson"), name=f"Pareto front ({screening})", hoverinfo="skip",
        ))  # fmt: skip
    if best_cfg is not None:
        fig.add_hline(y=best_cfg["fid"], line_dash="dash", line_color="#1f77b4", annotation_text="best CFG FID")
        fig.add_vline(x=best_cfg["gflops_per_sample"], line_dash="dash", line_color="#1f77b4")
    fig.update_layout(
        title=f"{study.study_name}: {metric} vs cost (filled: {screening}; open: {final})",
        xaxis_title="GFLOPs per sample (all sampling steps)", yaxis_title=f"{metric} (lower is better)",
        template="plotly_white", hovermode="closest",
    )  # fmt: skip
    # plotly.js inline: the report must open on cluster machines without internet access.
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def _plot_hypervolume(history: list[tuple[int, float]], ref: tuple[float, float] | None, path: Path) -> Path:
    fig = _figure((7, 4))
    ax = fig.subplots()
    if history:
        ax.step([n for n, _ in history], [v for _, v in history], where="post", marker=".", ms=4)
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume (FID × GFLOPs/sample)")
    ref_text = "none (no COMPLETE trial)" if ref is None else f"(FID {ref[0]:.4g}, {ref[1]:.4g} GFLOPs)"
    ax.set_title(f"Hypervolume of the Pareto front, reference {ref_text}")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


def _w_bands(scales: np.ndarray) -> list[np.ndarray]:
    """Index sets of 1-4 quantile bands of the guidance scale (fewer when there are few distinct ``w``)."""
    n = len(scales)
    wanted = min(len(np.unique(scales)), 4 if n >= 48 else 3 if n >= 18 else 2)
    edges = np.quantile(scales, np.linspace(0, 1, wanted + 1))[1:-1]
    band = np.searchsorted(edges, scales, side="right")
    return [np.flatnonzero(band == b) for b in range(wanted) if np.any(band == b)]


def _plot_heatmaps(study: optuna.Study, sg: list[dict], path: Path) -> Path:
    """Mean screening FID of SG trials binned over (γ_strong, γ_weak), one panel per band of ``w``."""
    from matplotlib.patches import Rectangle

    metric, screening, _ = _titles(study)
    scale = np.array([r["scale"] for r in sg], dtype=float)
    gs = np.array([r["gamma_strong"] for r in sg], dtype=float)
    gw = np.array([r["gamma_weak"] for r in sg], dtype=float)
    fid = np.array([r["fid"] for r in sg], dtype=float)
    edges = np.linspace(0.0, HEATMAP_LIMIT, HEATMAP_BINS + 1)
    to_bin = lambda g: np.clip((g / HEATMAP_LIMIT * HEATMAP_BINS).astype(int), 0, HEATMAP_BINS - 1)
    panels = []
    for idx in _w_bands(scale):
        total, count = np.zeros((HEATMAP_BINS,) * 2), np.zeros((HEATMAP_BINS,) * 2, dtype=int)
        np.add.at(total, (to_bin(gw[idx]), to_bin(gs[idx])), fid[idx])  # rows: γ_weak (y), columns: γ_strong (x)
        np.add.at(count, (to_bin(gw[idx]), to_bin(gs[idx])), 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            panels.append((idx, np.where(count > 0, total / count, np.nan), count))
    vmin, vmax = np.nanmin([np.nanmin(p[1]) for p in panels]), np.nanmax([np.nanmax(p[1]) for p in panels])
    vmax = vmax if vmax > vmin else vmin + 1.0
    fig = _figure((4.6 * len(panels) + 1.2, 5.0))
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (idx, mean, count) in zip(axes, panels, strict=True):
        mesh = ax.pcolormesh(edges, edges, np.ma.masked_invalid(mean), cmap="viridis_r", vmin=vmin, vmax=vmax)
        for iy in range(HEATMAP_BINS):
            for ix in range(HEATMAP_BINS):
                x, y = edges[ix], edges[iy]
                if ix > iy:  # the whole bin has γ_strong >= γ_weak: outside SG's domain
                    ax.add_patch(Rectangle((x, y), edges[1], edges[1], facecolor="#dddddd", hatch="//",
                                           edgecolor="#aaaaaa", lw=0))  # fmt: skip
                elif count[iy, ix]:
                    dark = (mean[iy, ix] - vmin) / (vmax - vmin) > 0.5  # viridis_r is dark at high FID
                    ax.text(x + edges[1] / 2, y + edges[1] / 2, f"{mean[iy, ix]:.1f}\nn={count[iy, ix]}",
                            ha="center", va="center", fontsize=7, color="white" if dark else "black")  # fmt: skip
        ax.scatter(gs[idx], gw[idx], s=6, color="black", alpha=0.35)
        best = idx[np.argmin(fid[idx])]
        ax.scatter([gs[best]], [gw[best]], marker="*", s=160, color="red", edgecolors="white",
                   label=f"best: {fid[best]:.1f} at γ=({gs[best]:g}, {gw[best]:g})")  # fmt: skip
        ax.plot([0, HEATMAP_LIMIT], [0, HEATMAP_LIMIT], color="grey", lw=0.8)
        ax.set(xlim=(0, HEATMAP_LIMIT), ylim=(0, HEATMAP_LIMIT), aspect="equal", xlabel="γ_strong", ylabel="γ_weak")
        lo, hi = scale[idx].min(), scale[idx].max()
        band = f"w = {lo:g}" if lo == hi else f"w ∈ [{lo:g}, {hi:g}]"
        ax.set_title(f"{band} ({len(idx)} trials)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(mesh, ax=list(axes), label="mean FID per bin (lower is better)", shrink=0.9)
    fig.suptitle(f"{study.study_name}: {metric} ({screening}) of SG trials over (γ_strong, γ_weak) by band of w; "
                 "hatched: γ_strong ≥ γ_weak", fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


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
    ``scale``/``gamma_strong``/``gamma_weak``; a stale one is removed and ``summary.json`` notes why) and
    ``summary.json``. With both ``tracking_uri`` and ``parent_run_id`` every file is also logged as an
    artifact of that MLflow run under ``report/`` (a later call overwrites them). Safe to call on a
    study without any COMPLETE trial.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [_row(t) for t in _complete(study)]
    front = pareto_table(study)
    ref = default_reference_point(study)
    history = hypervolume_history(study, ref)
    families = sorted({r["family"] for r in rows if r["family"] != "cfg"} | {"sg"})
    versus = {family: compare_to_best_cfg(rows, family) for family in families}
    best_cfg = versus["sg"]["best_cfg"]
    notes: list[str] = []
    config = study.user_attrs.get("config")
    objectives = list((config if isinstance(config, dict) else {}).get("objectives") or DEFAULT_OBJECTIVES)
    if objectives != list(DEFAULT_OBJECTIVES):  # the driver allows others; this report reads values as FID, GFLOPs
        notes.append(f"objectives are {objectives}: what this report calls FID and GFLOPs are values[0] and values[1]")

    files = {
        "pareto.png": _plot_pareto_png(study, rows, front, best_cfg, out_dir / "pareto.png"),
        "pareto.html": _plot_pareto_html(study, rows, front, best_cfg, out_dir / "pareto.html"),
        "pareto.csv": _write_csv(out_dir / "pareto.csv", front, TABLE_COLUMNS),
        "trials.csv": _write_csv(out_dir / "trials.csv", *_trials_rows(study)),
    }
    states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
    hv_rows = [{"number": n, "state": states[n], "hypervolume": v} for n, v in history]
    files["hypervolume.csv"] = _write_csv(out_dir / "hypervolume.csv", hv_rows, ["number", "state", "hypervolume"])
    files["hypervolume.png"] = _plot_hypervolume(history, ref, out_dir / "hypervolume.png")
    keys = ("scale", "gamma_strong", "gamma_weak")
    sg = [r for r in rows if r["family"] == "sg" and all(r[k] is not None for k in keys)]
    if len(sg) >= MIN_HEATMAP_TRIALS:
        files["heatmaps.png"] = _plot_heatmaps(study, sg, out_dir / "heatmaps.png")
    else:
        (out_dir / "heatmaps.png").unlink(missing_ok=True)
        notes.append(f"heatmaps.png skipped: {len(sg)} COMPLETE SG trial(s) with w and γ's, need {MIN_HEATMAP_TRIALS}")

    metric, screening, final = _titles(study)
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
        "sg_beats_best_cfg": versus["sg"],  # the study's question
        "vs_best_cfg": versus,  # the same question for every other family
        "notes": notes,
        "files": sorted([*files, "summary.json"]),
    }
    files["summary.json"] = out_dir / "summary.json"
    files["summary.json"].write_text(json.dumps(_jsonable(summary), indent=2, ensure_ascii=False) + "\n")
    for note in notes:
        log.info(note)

    if tracking_uri and parent_run_id:
        from mlflow.tracking import MlflowClient

        from sgexp.run_record import log_artifact_file

        client = MlflowClient(tracking_uri=tracking_uri)
        for path in files.values():
            log_artifact_file(client, path, "report", run_id=parent_run_id)
    return files
