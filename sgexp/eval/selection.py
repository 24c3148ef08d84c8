"""The best guidance scale w per setting, picked as the paper does (its Figure 5: each method at its best w).

``select_best_w`` scores every w of a grid for each setting whose rule has a scale (every two-branch
rule; unguided ``none`` keeps w = 1) on a small sample, all on the same sample indices (common random
numbers), and keeps the w with the lowest FID; ``sgexp.evaluate select=best_w`` then scores the chosen
settings on the full sample count. It is pure: it takes the settings and a scoring callable, so it runs
without a model (tests/test_best_w.py).

How decisive a pick is: for the picked w* against every other w of the same setting, the paired
bootstrap interval of FID(w) − FID(w*) (``sgexp.eval.bootstrap``, same redraws for all w). A w whose
interval includes 0 is *within the noise* of the pick: the sample cannot tell them apart. The pick is
still the lowest point estimate (ties: the smaller w), so it is deterministic; ``within_noise`` lists the
w that a larger sample might have picked instead.

The selection sample has its own seed (``sgexp.evaluate`` uses ``seed + 1`` unless ``select_seed`` is
set): the final FID of the picked w is then measured on samples the pick never saw, and is not biased
low by the choice (a minimum over noisy estimates is).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from sgexp.checks import check_choice, check_guidance_scale, check_positive_int, fail
from sgexp.diffusion.guidance import RULES
from sgexp.eval.bootstrap import check_level, fid_replicates, interval, sign
from sgexp.eval.metrics import ReferenceStats
from sgexp.eval.sampling import Setting
from sgexp.eval.settings import make_settings

SELECTS = ("none", "best_w")
# a setting's rows and features on the selection sample: Evaluator.score_with_features bound to it
Score = Callable[[Setting], tuple[dict, Mapping[str, np.ndarray]]]


def check_selection(
    select: str, w_grid: Sequence[float], select_samples: int, settings: Mapping[str, Mapping]
) -> list[float]:
    """The grid, ascending, after checking the keys of ``select=best_w`` against the ``settings``
    (``{name: {rule, scale, ...}}``, already validated), before any sampling; ``[]`` for ``select=none``.

    Every w must be a guidance scale the rules accept (>= 1; w = 1 is the strong branch alone), each once,
    and at least one setting must have a scale. ``select_samples`` may exceed the final ``num_samples``:
    picking on more samples than are reported is unusual but not wrong."""
    check_choice("select", select, SELECTS)
    if select == "none":
        return []
    check_positive_int("select_samples", select_samples)
    if select_samples < 2:  # a covariance needs two samples
        raise fail("select_samples", select_samples, "FID needs at least 2 samples")
    if isinstance(w_grid, (str, bytes)) or not isinstance(w_grid, Sequence) or len(w_grid) == 0:
        raise fail("w_grid", w_grid, "select=best_w needs a non-empty list of guidance scales, e.g. [1.5, 2, 3, 4]")
    grid = [check_guidance_scale(f"w_grid[{i}]", w) for i, w in enumerate(w_grid)]
    if len(set(grid)) < len(grid):
        raise fail("w_grid", list(w_grid), "each scale may appear only once")
    if not any(has_scale(spec) for spec in settings.values()):
        raise fail("select", select, f"none of the settings {list(settings)} has a guidance scale to select")
    return sorted(grid)


def has_scale(spec: Mapping) -> bool:
    """Whether a setting's rule has a guidance scale to select: every two-branch rule, not ``none``."""
    return RULES[spec.get("rule", "none")].weak is not None


def candidate_name(name: str, w: float) -> str:
    return f"{name}@w={w:g}"


def candidates(settings: Mapping[str, Mapping], grid: Sequence[float]) -> dict[str, list[tuple[float, Setting]]]:
    """``{name: [(w, Setting named "name@w=..."), ...]}`` for every setting with a scale, built (and so
    checked) now. ``settings`` are already-validated ``{name: {rule, scale, ...}}`` mappings: a warning
    of a rule (crossing schedules) was shown for the setting itself and is not repeated for each w."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, spec in settings.items():
            if has_scale(spec):
                specs = {candidate_name(name, w): {**spec, "scale": w} for w in grid}
                out[name] = list(zip(grid, make_settings(specs), strict=True))
    return out


def select_best_w(
    settings: Mapping[str, Mapping],
    grid: Sequence[float],
    score: Score,
    reference: ReferenceStats,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    save: Callable[[dict], None] | None = None,
) -> tuple[dict[str, dict], dict]:
    """``(chosen, selection)``: the settings with each scaled one's ``scale`` set to its best w, and
    the record of how it was picked.

    ``score(setting)`` scores one candidate on the selection sample and returns its row (``fid``) and
    features (``{"fid": (N, dim)}``, sample-index order, the same indices for every candidate).
    ``reference`` is the FID's; ``n_boot`` redraws (0: no intervals, ``within_noise`` is then None)
    at ``level`` with draws from ``seed``. ``save(record)`` is called after every scored candidate
    (the record so far, with each candidate's full row), so a crashed run can be understood.

    ``selection["settings"][name]``: ``rule``, ``picked`` (w*), ``fid`` (per w, ascending w),
    ``paired`` (per w: ``diff`` = FID(w) − FID(w*) and its ``ci``), ``within_noise`` (the w whose
    interval includes 0, w* first) and ``decisive`` (no other w within the noise)."""
    grid = sorted(float(w) for w in grid)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise fail("n_boot", n_boot, "must be an integer >= 0 (0: no intervals)")
    check_level(level)
    todo = candidates(settings, grid)
    if not todo:
        raise fail("select", "best_w", f"none of the settings {list(settings)} has a guidance scale to select")
    record = {
        "metric": "fid",
        "grid": grid,
        "bootstrap": n_boot,
        "ci_level": level,
        "fixed": [name for name in settings if name not in todo],  # no scale: scored as configured
        "settings": {},
        "rows": {},  # every candidate's row (selection.json only)
    }
    chosen = {name: dict(spec) for name, spec in settings.items()}
    for name, cands in todo.items():
        fids, reps = {}, {}
        for w, setting in cands:
            row, features = score(setting)
            fids[w] = float(row["fid"])
            if n_boot:  # keep the replicates, not the features: n_boot floats per candidate
                _, reps[w] = fid_replicates(features["fid"], reference, n_boot, seed)
            record["rows"][setting.name] = row
            if save is not None:
                save(record)
        # lowest FID (a failed, non-finite one never wins); an exact tie goes to the smaller w
        picked = min(grid, key=lambda w: (fids[w] if math.isfinite(fids[w]) else math.inf, w))
        record["settings"][name] = _verdict(settings[name]["rule"], grid, fids, reps, picked, level)
        chosen[name]["scale"] = picked
        if save is not None:
            save(record)
    return chosen, record


def _verdict(rule: str, grid, fids: dict, reps: dict, picked: float, level: float) -> dict:
    """One setting's selection record: FIDs per w and the paired interval of each w against the pick."""
    paired = []
    for w in grid:
        diff = fids[w] - fids[picked]
        ci = list(interval(reps[w] - reps[picked], diff, level)) if reps else None
        paired.append({"w": w, "diff": diff, "ci": ci})
    within = None
    if reps:  # "within the noise": the interval of FID(w) − FID(w*) does not lie above 0
        within = [picked] + [p["w"] for p in paired if p["w"] != picked and sign(p["ci"]) != 1]
    return {
        "rule": rule,
        "picked": picked,
        "fid": [{"w": w, "fid": fids[w]} for w in grid],
        "paired": paired,
        "within_noise": within,
        "decisive": None if within is None else len(within) == 1,
    }


def describe(name: str, verdict: dict) -> str:
    """One line for logs and reports, e.g. ``cfg: w=1.5 (FID 12.30); w=2 within the noise``."""
    fid = next(f["fid"] for f in verdict["fid"] if f["w"] == verdict["picked"])
    text = f"{name}: w={verdict['picked']:g} (FID {fid:.2f})"
    if verdict["within_noise"] is None:
        return text + "; no intervals (bootstrap=0)"
    others = [f"{w:g}" for w in verdict["within_noise"][1:]]
    if not others:
        return text + "; every other w is worse beyond the noise"
    return text + f"; w={', '.join(others)} within the noise (paired interval includes 0)"
