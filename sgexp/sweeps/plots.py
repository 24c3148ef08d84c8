"""Figures of a guidance study: the Pareto plot (PNG and interactive HTML), the hypervolume history,
FID heatmaps of SG trials over (γ_strong, γ_weak) per band of w (``plot_heatmaps``: binned, any sampler),
and a grid study's exact maps, one panel per w (``plot_grid_heatmaps``: e.g. AG+SG over the full [0, 0.8]²,
the SG paper's Figure 6, ``sweeps/fig6_ag_sg.yaml``).

Plots use matplotlib's ``Figure`` with the Agg canvas directly, never pyplot: nothing process-wide (the
pyplot backend, its figure registry) is touched, so the driver can call this after every batch.
``sgexp.sweeps.report`` decides what to plot and calls these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import optuna
import plotly.graph_objects as go
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sgexp.diffusion.guidance import RULES


class Style(NamedTuple):
    label: str
    marker: str  # matplotlib
    colour: str  # hex, which both libraries accept
    symbol: str  # plotly


# The paper's colours for the rules it compares (matplotlib's tab10); any other rule or family name gets
# the next entry of PALETTE in RULES order, so a new rule plots without an edit here.
PAPER_STYLE = {
    "none": ("X", "#000000", "x"),
    "cfg": ("o", "#1f77b4", "circle"),
    "icg": ("h", "#17becf", "hexagon"),
    "sg": ("^", "#ff7f0e", "triangle-up"),
    "cfg_sg": ("s", "#2ca02c", "square"),
    "ag": ("D", "#9467bd", "diamond"),
    "ag_sg": ("P", "#8c564b", "cross"),
}
PALETTE = (
    ("v", "#e377c2", "triangle-down"),
    ("<", "#bcbd22", "triangle-left"),
    (">", "#7f7f7f", "triangle-right"),
    ("p", "#9edae5", "pentagon"),
    ("*", "#ffbb78", "star"),
    ("d", "#98df8a", "diamond-tall"),
)
HEATMAP_BINS, HEATMAP_LIMIT = 6, 0.95


def style(family: str) -> Style:
    """How a family (a rule's name, or a study's name for a family) is drawn: its rule's label, and the
    paper's marker and colour, else the next ones of the palette."""
    label = RULES[family].label if family in RULES else str(family)
    if family in PAPER_STYLE:
        return Style(label, *PAPER_STYLE[family])
    others = [name for name in RULES if name not in PAPER_STYLE]
    index = others.index(family) if family in others else len(others) + sum(map(ord, str(family)))
    return Style(label, *PALETTE[index % len(PALETTE)])


def _label(row: dict) -> str:
    """``SG w=5 γ=0.5/0.9``: the scale of a guided rule, the γ's the rule reads when they are not all 0."""
    setting = row.get("setting") if isinstance(row.get("setting"), dict) else {}
    rule = RULES.get(setting.get("rule", row["family"]))
    label = style(row["family"]).label
    if (rule is None or rule.weak is not None) and row["scale"] is not None:
        label += f" w={row['scale']:g}"
    gammas = [row[k] for k in (rule.reads if rule else ()) if row.get(k) is not None]
    if any(gammas):
        label += " γ=" + "/".join(f"{g:g}" for g in gammas)
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


def titles(study: optuna.Study) -> tuple[str, str, str]:
    """(metric, screening description, final description) from the study's user attributes."""
    attrs = study.user_attrs
    screening, final = attrs.get("samples_per_trial", "?"), attrs.get("final_samples", "?")
    return str(attrs.get("metric", "FID")), f"screening, {screening} samples", f"final, {final} samples"


def _figure(size: tuple[float, float]) -> Figure:
    """A matplotlib figure on an Agg canvas of its own: no pyplot, no process-wide backend or registry."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_pareto_png(study: optuna.Study, rows: list[dict], front: list[dict], best_cfg: dict | None, path: Path):
    metric, screening, final = titles(study)
    fig = _figure((9, 6))
    ax = fig.subplots()
    for family in sorted({r["family"] for r in rows}):
        label, marker, colour, _ = style(family)
        pts = [r for r in rows if r["family"] == family]
        x, y = [r["gflops_per_sample"] for r in pts], [r["fid"] for r in pts]
        ax.scatter(x, y, marker=marker, color=colour, s=40, alpha=0.8, label=f"{label} ({len(pts)})", zorder=3)
        finals = [r for r in pts if r["fid_final"] is not None]
        for r in finals:  # screening -> final: how much the screening FID moved with more samples
            ax.plot([r["gflops_per_sample"]] * 2, [r["fid"], r["fid_final"]], color=colour, lw=0.8, ls=":")
        if finals:
            x, y = [r["gflops_per_sample"] for r in finals], [r["fid_final"] for r in finals]
            hollow = dict(facecolors="none", edgecolors=colour, s=90, label=f"{label} ({final})", zorder=4)
            ax.scatter(x, y, marker=marker, **hollow)
        for r in pts:
            if r["baseline"]:
                xy = (r["gflops_per_sample"], r["fid"])
                ax.annotate(_label(r), xy, textcoords="offset points", xytext=(6, 6), fontsize=8)
    if front:
        x, y = [r["gflops_per_sample"] for r in front], [r["fid"] for r in front]
        ax.step(x, y, where="post", color="crimson", lw=1.5, label=f"Pareto front ({screening})", zorder=2)
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


def plot_pareto_html(study: optuna.Study, rows: list[dict], front: list[dict], best_cfg: dict | None, path: Path):
    metric, screening, final = titles(study)
    fig = go.Figure()
    for family in sorted({r["family"] for r in rows}):
        label, _, colour, symbol = style(family)
        pts = [r for r in rows if r["family"] == family]
        screened = go.Scatter(
            x=[r["gflops_per_sample"] for r in pts],
            y=[r["fid"] for r in pts],
            mode="markers+text",
            name=f"{label} ({screening})",
            marker=dict(symbol=symbol, color=colour, size=9),
            text=[_label(r) if r["baseline"] else "" for r in pts],
            textposition="top right",
            hovertext=[_hover(r) for r in pts],
            hoverinfo="text",
        )
        fig.add_trace(screened)
        finals = [r for r in pts if r["fid_final"] is not None]
        if finals:
            rescored = go.Scatter(
                x=[r["gflops_per_sample"] for r in finals],
                y=[r["fid_final"] for r in finals],
                mode="markers",
                name=f"{label} ({final})",
                marker=dict(symbol=f"{symbol}-open", color=colour, size=13),
                hovertext=[_hover(r) for r in finals],
                hoverinfo="text",
            )
            fig.add_trace(rescored)
    if front:
        line = dict(shape="hv", color="crimson")
        x, y = [r["gflops_per_sample"] for r in front], [r["fid"] for r in front]
        fig.add_trace(
            go.Scatter(x=x, y=y, mode="lines", line=line, name=f"Pareto front ({screening})", hoverinfo="skip")
        )
    if best_cfg is not None:
        fig.add_hline(y=best_cfg["fid"], line_dash="dash", line_color="#1f77b4", annotation_text="best CFG FID")
        fig.add_vline(x=best_cfg["gflops_per_sample"], line_dash="dash", line_color="#1f77b4")
    fig.update_layout(
        title=f"{study.study_name}: {metric} vs cost (filled: {screening}; open: {final})",
        xaxis_title="GFLOPs per sample (all sampling steps)",
        yaxis_title=f"{metric} (lower is better)",
        template="plotly_white",
        hovermode="closest",
    )
    # plotly.js inline: the report must open on cluster machines without internet access.
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def plot_hypervolume(history: list[tuple[int, float]], ref: tuple[float, float] | None, path: Path) -> Path:
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


def plot_heatmaps(study: optuna.Study, sg: list[dict], path: Path) -> Path:
    """Mean screening FID of SG trials binned over (γ_strong, γ_weak), one panel per band of ``w``."""
    metric, screening, _ = titles(study)
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
                    hatched = dict(facecolor="#dddddd", hatch="//", edgecolor="#aaaaaa", lw=0)
                    ax.add_patch(Rectangle((x, y), edges[1], edges[1], **hatched))
                elif count[iy, ix]:
                    dark = (mean[iy, ix] - vmin) / (vmax - vmin) > 0.5  # viridis_r is dark at high FID
                    text = f"{mean[iy, ix]:.1f}\nn={count[iy, ix]}"
                    colour = "white" if dark else "black"
                    ax.text(
                        x + edges[1] / 2, y + edges[1] / 2, text, ha="center", va="center", fontsize=7, color=colour
                    )
        ax.scatter(gs[idx], gw[idx], s=6, color="black", alpha=0.35)
        best = idx[np.argmin(fid[idx])]
        best_label = f"best: {fid[best]:.1f} at γ=({gs[best]:g}, {gw[best]:g})"
        ax.scatter([gs[best]], [gw[best]], marker="*", s=160, color="red", edgecolors="white", label=best_label)
        ax.plot([0, HEATMAP_LIMIT], [0, HEATMAP_LIMIT], color="grey", lw=0.8)
        ax.set(xlim=(0, HEATMAP_LIMIT), ylim=(0, HEATMAP_LIMIT), aspect="equal", xlabel="γ_strong", ylabel="γ_weak")
        lo, hi = scale[idx].min(), scale[idx].max()
        band = f"w = {lo:g}" if lo == hi else f"w ∈ [{lo:g}, {hi:g}]"
        ax.set_title(f"{band} ({len(idx)} trials)", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(mesh, ax=list(axes), label="mean FID per bin (lower is better)", shrink=0.9)
    title = f"{study.study_name}: {metric} ({screening}) of SG trials over (γ_strong, γ_weak) by band of w"
    fig.suptitle(f"{title}; hatched: γ_strong ≥ γ_weak", fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_grid_heatmaps(study: optuna.Study, rows: list[dict], family: str, path: Path) -> Path:
    """Screening FID of a grid study's ``family`` trials at their exact (γ_strong, γ_weak), one panel per w;
    every cell is a guidance setting (AG+SG's weak model may sit at γ_w <= γ_s), a missing one is blank."""
    metric, screening, _ = titles(study)
    xs = sorted({r["gamma_strong"] for r in rows})
    ys = sorted({r["gamma_weak"] for r in rows})
    scales = sorted({r["scale"] for r in rows})
    maps = {}
    for w in scales:
        total, count = np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs)), dtype=int)
        for r in (r for r in rows if r["scale"] == w):  # a retried point counts once per COMPLETE trial
            total[ys.index(r["gamma_weak"]), xs.index(r["gamma_strong"])] += r["fid"]
            count[ys.index(r["gamma_weak"]), xs.index(r["gamma_strong"])] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            maps[w] = np.where(count > 0, total / count, np.nan)
    vmin, vmax = min(np.nanmin(m) for m in maps.values()), max(np.nanmax(m) for m in maps.values())
    vmax = vmax if vmax > vmin else vmin + 1.0
    fig = _figure((0.55 * len(xs) * len(scales) + 1.6 * len(scales) + 1.2, 0.55 * len(ys) + 2.2))
    axes = np.atleast_1d(fig.subplots(1, len(scales), squeeze=False)[0])
    for ax, w in zip(axes, scales, strict=True):
        fid = maps[w]
        cells_x, cells_y = np.arange(len(xs) + 1) - 0.5, np.arange(len(ys) + 1) - 0.5
        mesh = ax.pcolormesh(cells_x, cells_y, np.ma.masked_invalid(fid), cmap="viridis_r", vmin=vmin, vmax=vmax)
        for iy, ix in zip(*np.nonzero(np.isfinite(fid)), strict=True):
            dark = (fid[iy, ix] - vmin) / (vmax - vmin) > 0.5
            colour = "white" if dark else "black"
            ax.text(ix, iy, f"{fid[iy, ix]:.1f}", ha="center", va="center", fontsize=7, color=colour)
        iy, ix = np.unravel_index(np.nanargmin(fid), fid.shape)
        best_label = f"best: {fid[iy, ix]:.1f} at γ=({xs[ix]:g}, {ys[iy]:g})"
        ax.scatter([ix], [iy], marker="*", s=220, facecolors="none", edgecolors="red", lw=1.5, label=best_label)
        if xs == ys:  # γ_s = γ_w; below it the weak model runs denser than the strong one
            ax.plot([-0.5, len(xs) - 0.5], [-0.5, len(ys) - 0.5], color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set(xlabel="γ_strong", ylabel="γ_weak", aspect="equal", title=f"w = {w:g}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.colorbar(mesh, ax=list(axes), label=f"{metric} (lower is better)", shrink=0.9)
    title = f"{study.study_name}: {metric} ({screening}) of {style(family).label} over (γ_strong, γ_weak)"
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
