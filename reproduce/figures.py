"""The PNGs of docs/results.md, drawn from ``results.collect``'s record.

matplotlib ``Figure`` objects on their own Agg canvas (no pyplot state), as in ``sgexp.sweeps.plots``,
whose markers and colours the guidance rules keep here. Each function returns the path written, or None
when its stages have not finished.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from reproduce.stages import ROOT
from sgexp.diffusion.guidance import RULES
from sgexp.sweeps.plots import style

MODEL_STYLE = {"tread": ("TREAD (γ_train 0.5)", "#ff7f0e", "o"), "dense": ("dense", "#1f77b4", "s")}


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def tread_vs_dense(record: dict, path: Path) -> Path | None:
    curves = record["curve"]
    if not any(curves.values()):
        return None
    fig = _figure((10, 4))
    ax_fid, ax_acc = fig.subplots(1, 2)
    for model, points in curves.items():
        if not points:
            continue
        label, colour, marker = MODEL_STYLE[model]
        points = sorted(points, key=lambda p: p["step"])
        steps = [p["step"] for p in points]
        ax_fid.plot(steps, [p["fid"] for p in points], marker=marker, color=colour, label=label)
        ax_acc.plot(steps, [p["class_accuracy"] for p in points], marker=marker, color=colour, label=label)
    n = record["preset"]["curve_samples"]
    ax_fid.set(xlabel="training step", ylabel=f"unguided domain FID ({n} samples)", title="FID (lower is better)")
    ax_acc.set(xlabel="training step", ylabel="class accuracy of the samples", title="Class accuracy")
    for ax in (ax_fid, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)
    return path


def guidance(record: dict, path: Path) -> Path | None:
    rows = list(record["guidance"].values())
    if not rows:
        return None
    fig = _figure((8, 5.5))
    ax = fig.subplots()
    for rule in dict.fromkeys(r["rule"] for r in rows):  # in the table's order
        pts = sorted((r for r in rows if r["rule"] == rule), key=lambda r: (r["gflops_per_sample"], r["scale"]))
        _, marker, colour, _ = style(rule)
        x, y = [r["gflops_per_sample"] for r in pts], [r["fid"] for r in pts]
        line = "" if rule == "none" else ":"
        ax.plot(x, y, marker=marker, color=colour, linestyle=line, markersize=8, label=RULES[rule].label)
        for r in pts:
            text = f"w={r['scale']:g}" if rule != "none" else f"γ={r['gamma_strong']:g}"
            ax.annotate(text, (r["gflops_per_sample"], r["fid"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    n = record["preset"]["table_samples"]
    ax.set(xlabel="GFLOPs per sample", ylabel=f"domain FID ({n} samples)")
    ax.set_title("Guidance on the TREAD model (same sample seeds for every point)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110)
    return path


def heatmaps(record: dict, path: Path) -> Path | None:
    maps = record["heatmaps"]
    if not maps:
        return None
    gammas = list(record["preset"]["heatmap_gammas"])
    grids = {}
    for scale, rows in sorted(maps.items(), key=lambda kv: float(kv[0])):
        grid = np.full((len(gammas), len(gammas)), np.nan)
        for r in rows:
            grid[gammas.index(r["gamma_strong"]), gammas.index(r["gamma_weak"])] = r["fid"]
        grids[float(scale)] = grid
    values = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = float(values.min()), float(values.max())
    fig = _figure((5.2 * len(grids) + 0.8, 4.6))
    axes = np.atleast_1d(fig.subplots(1, len(grids)))
    for ax, (scale, grid) in zip(axes, grids.items(), strict=True):
        image = ax.imshow(grid, origin="lower", cmap="viridis_r", vmin=vmin, vmax=vmax)
        best = np.unravel_index(np.nanargmin(grid), grid.shape)
        for (i, j), value in np.ndenumerate(grid):
            if math.isfinite(value):
                weight = "bold" if (i, j) == best else "normal"
                light = (value - vmin) < 0.5 * (vmax - vmin)  # viridis_r: low FID is drawn yellow
                colour = "black" if light else "white"
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color=colour, weight=weight)
        ax.add_patch(_box(best))
        ticks = [f"{g:g}" for g in gammas]
        ax.set_xticks(range(len(gammas)), ticks)
        ax.set_yticks(range(len(gammas)), ticks)
        ax.set(xlabel="γ_weak", ylabel="γ_strong", title=f"SG, w = {scale:g}")
    fig.colorbar(image, ax=list(axes), label=f"domain FID ({record['preset']['heatmap_samples']} samples)")
    fig.savefig(path, dpi=110)
    return path


def _box(cell: tuple[int, int]) -> Rectangle:
    i, j = cell
    return Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)


def pareto(record: dict, path: Path) -> Path | None:
    """The sweep's own Pareto plot (``sgexp.sweeps.plots``), copied next to the other figures."""
    sweep = record.get("sweep")
    source = ROOT / sweep["pareto_png"] if sweep else None  # relative to the repository, or absolute
    if source is None or not source.is_file():
        return None
    shutil.copyfile(source, path)
    return path


def write_all(record: dict, docs: Path) -> dict[str, Path | None]:
    docs.mkdir(parents=True, exist_ok=True)
    return {
        "tread_vs_dense": tread_vs_dense(record, docs / "results_tread_vs_dense.png"),
        "guidance": guidance(record, docs / "results_guidance.png"),
        "heatmap": heatmaps(record, docs / "results_heatmap.png"),
        "pareto": pareto(record, docs / "results_pareto.png"),
    }
