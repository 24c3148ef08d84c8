"""Bootstrap confidence intervals over sample indices, the reference statistics held fixed.

Efron's bootstrap (Efron 1979; Efron & Tibshirani 1993, "An Introduction to the Bootstrap"): redraw the
N sample indices with replacement, recompute the metric on the redrawn set, repeat ``n_boot`` times; the
spread of these replicates is the spread the metric would have over other sample seeds. The reference
(real-data mean and covariance, or real features for precision) is a fixed target, not resampled.

Every setting ``sgexp.evaluate`` scores uses the same sample indices (common random numbers: sample i has
the same noise, label and routing seeds in every setting). Replicate j of every setting uses the same
redrawn indices (the draws depend only on ``seed``), so FID(a) − FID(b) on draw j is a *paired*
replicate of the difference: what sample i contributes to both settings cancels, and the interval of
the difference is far narrower than the two FID intervals suggest.

A redraw is a count vector w (w_i = how often index i was drawn, Σ w = N); nothing is copied. With
Xc = X − m the centred features (m their mean) and R = Σ_r^{1/2} the reference's covariance root:

    μ_w = m + δ,  δ = Xcᵀw / N
    Σ_w = (Xcᵀ diag(w) Xc − N δδᵀ) / (N − 1)                     (np.cov of the redrawn set)
    FID = |μ_w − μ_r|² + Tr Σ_r + Tr Σ_w − 2 Tr (R Σ_w R)^{1/2}

(Heusel et al. 2017; R Σ_w R is similar to clean-fid's Σ_w Σ_r, so the traces of their roots agree.) The
last trace is a sum of square roots of eigenvalues of a symmetric PSD matrix: with A = Xc R (once),
R Σ_w R = Bᵀ P B / (N − 1), B = diag(√w) A, P = I − √w√wᵀ/N. Below d indices it is cheaper as the
eigenvalues of P (B Bᵀ) P, a matrix the size of the distinct drawn indices (~0.63 N) built from the
Gram matrix A Aᵀ (``_Exact``).

The default (``method="auto"``) is the first-order expansion of FID in w instead (the infinitesimal
jackknife / linearised bootstrap, Efron & Tibshirani 1993 §21.3): FID + Σ_i (w_i − 1) g_i with g_i the
influence of sample i (``_Linear``): one eigenproblem per setting, then free per draw. The exact path
costs one eigenproblem per draw (1k × 2048-d: 0.2 s each on a 2-core CPU, so minutes per setting; a
redraw of 50k samples also costs N·d² for Σ_w) and, worse, a redrawn set holds only ~0.63 N distinct
samples: its covariance loses rank and its FID spread is inflated. Measured (60 seeds, Gaussian features
vs N(0, I)): seed-to-seed sd of FID 1.24 at N=200, d=400, exact bootstrap sd 8.5-9.1, linear 1.9-2.0;
0.24 at N=400, d=100: exact 0.59-0.64, linear 0.35-0.38; both agree where N ≫ d. Both are conservative
(too wide), the linear one far less so. ``method="exact"`` stays for checks.

Intervals (``interval``): the percentile interval (Efron & Tibshirani 1993 §13.3) of the replicates,
shifted by the bootstrap's bias estimate (mean of replicates − estimate, §10.2). A plug-in FID is
biased upwards and a redrawn set (duplicates, ~0.63 N distinct samples) is more so: at small N every
replicate can lie above the estimate. The shift removes that resampling bias, so the interval is the
estimate ± the seed-to-seed spread; for a paired difference of similar settings the shift is ~0.

sFID (Nash et al. 2021, the ADM evaluator's spatial FID) is a Fréchet distance too, on other features
(``features["sfid"]``) against the spatial statistics (``ReferenceStats.mu_s``/``sigma_s``): the same
replicates, with ``dataclasses.replace(ref, mu=ref.mu_s, sigma=ref.sigma_s)`` as the reference.

Precision is a mean of per-sample indicators ("inside the real k-NN manifold", the real manifold
fixed), so a redraw is a weighted mean and its bootstrap is the textbook one. Recall has no interval:
it is the fraction of *real* samples inside the k-NN balls of the generated ones, and the radii of
those balls depend on the generated set itself. A redrawn set holds duplicates (~0.37 N indices
drawn twice or more), whose k-th neighbour is partly their own copies: the radii shrink (to 0 for an
index drawn more than k times) and the redrawn recall is biased low by an amount that is not the
seed-to-seed spread. No weighting of the fixed generated set reproduces that spread (a subsample
without replacement would, but at a smaller N, where recall itself differs), so none is reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import replace

import numpy as np

from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.eval.manifolds import precision_indicators
from sgexp.eval.metrics import ReferenceStats, pr_reference

METHODS = ("auto", "exact", "linear")
_ROOT: tuple[object, np.ndarray] | None = None  # (sigma, its root): one reference serves many settings


# ----------------------------------------------------------------------------- draws and intervals


def draws(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """``n_boot`` count vectors w (n,) of n indices drawn with replacement; the same for the same seed."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n, n), minlength=n)


def check_level(level: float, name: str = "level") -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise fail(name, level, "a confidence level must be a number in (0, 1), e.g. 0.95")
    return float(level)


def interval(replicates: np.ndarray, estimate: float, level: float = 0.95) -> tuple[float, float]:
    """Bias-shifted percentile interval: the replicates' (1 ∓ level)/2 quantiles minus their mean's
    offset from ``estimate`` (see the module docstring)."""
    check_level(level)
    replicates = np.asarray(replicates, dtype=np.float64)
    bias = replicates.mean() - estimate
    lo, hi = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2]) - bias
    return float(lo), float(hi)


def sign(ci: tuple[float, float] | list[float]) -> int:
    """+1 if the interval lies above 0, -1 if below, 0 if it contains 0 (the comparison is inconclusive)."""
    lo, hi = ci
    return 1 if lo > 0 else -1 if hi < 0 else 0


# ----------------------------------------------------------------------------- FID replicates


def _reference_root(sigma: np.ndarray) -> np.ndarray:
    """Σ_r^{1/2} (symmetric, negative rounding eigenvalues clipped); cached for the last reference."""
    global _ROOT
    if _ROOT is None or _ROOT[0] is not sigma:
        lam, vec = np.linalg.eigh(np.asarray(sigma, dtype=np.float64))
        _ROOT = (sigma, (vec * np.sqrt(lam.clip(0.0))) @ vec.T)
    return _ROOT[1]


class _Exact:
    """FID of the redrawn set w, computed from sums weighted by w (module docstring)."""

    def __init__(self, x: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray):
        self.n, d = x.shape
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(axis=0)
        self.xc = x - mean
        self.a = self.xc @ _reference_root(sigma_r)
        self.sq = (self.xc * self.xc).sum(axis=1)  # |xc_i|²: Tr Σ_w without forming Σ_w
        self.offset, self.tr_ref = mean - mu_r, float(np.trace(sigma_r))
        self.gram = self.a @ self.a.T if 0.64 * self.n < d else None  # ~0.63 N distinct indices per draw

    def __call__(self, w: np.ndarray) -> float:
        n, s = self.n, np.flatnonzero(w)
        ws = w[s].astype(np.float64)
        delta = ws @ self.xc[s] / n
        tr_w = (ws @ self.sq[s] - n * delta @ delta) / (n - 1)
        if self.gram is not None:  # eigenvalues of P (B Bᵀ) P, size len(s)
            root_w = np.sqrt(ws)
            k = self.gram[np.ix_(s, s)] * np.outer(root_w, root_w)
            v = root_w / math.sqrt(n)
            kv = k @ v
            m = k - np.outer(v, kv) - np.outer(kv, v) + (v @ kv) * np.outer(v, v)
        else:  # eigenvalues of Bᵀ P B, size d
            a = self.a[s]
            u = ws @ a / n
            m = a.T @ (ws[:, None] * a) - n * np.outer(u, u)
        tr_sqrt = np.sqrt(np.linalg.eigvalsh(m).clip(0.0)).sum() / math.sqrt(n - 1)
        d_mean = self.offset + delta
        return float(d_mean @ d_mean + self.tr_ref + tr_w - 2.0 * tr_sqrt)


class _Linear:
    """First-order FID of the redrawn set: FID + Σ_i (w_i − 1) g_i.

    With D = ∂FID/∂Σ = I − R (R Σ R)^{-1/2} R (pseudo-inverse on the null space) and ∂FID/∂μ = 2(μ − μ_r),
    a redraw moves the mean by Σ (w_i − 1) xc_i / N and the covariance by Σ (w_i − 1) xc_i xc_iᵀ / (N − 1)
    to first order, so g_i = 2 (μ − μ_r)·xc_i / N + xc_iᵀ D xc_i / (N − 1). Rows go through in blocks:
    50k × 2048 features need one float64 copy, not four.
    """

    def __init__(self, x: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray, block: int = 8192):
        xc = np.array(x, dtype=np.float64)  # our own copy, centred in place
        n, mean = len(xc), xc.mean(axis=0)
        xc -= mean
        blocks = [slice(i, i + block) for i in range(0, n, block)]
        root = _reference_root(sigma_r)
        sq = (xc * xc).sum(axis=1)
        if n < xc.shape[1]:  # R Σ R = Aᵀ A / (N − 1) through the smaller Gram matrix A Aᵀ = U Λ Uᵀ
            a = xc @ root
            lam, u = np.linalg.eigh(a @ a.T)
            keep = lam > max(lam.max(), 0.0) * 1e-12
            lam = lam[keep] / (n - 1)
            inner = ((u[:, keep] ** 2) * (lam * (n - 1)) * lam**-0.5).sum(axis=1)  # xc_iᵀ R (RΣR)^{-1/2} R xc_i
        else:
            rsr = np.zeros((xc.shape[1],) * 2)
            for rows in blocks:
                a = xc[rows] @ root
                rsr += a.T @ a
            lam, vec = np.linalg.eigh(rsr / (n - 1))  # R Σ R
            keep = lam > max(lam.max(), 0.0) * 1e-12
            lam, proj = lam[keep], root @ (vec[:, keep] * lam[keep] ** -0.25)
            inner = np.concatenate([((xc[rows] @ proj) ** 2).sum(axis=1) for rows in blocks])
        quad = sq - inner  # xc_iᵀ D xc_i
        offset = mean - mu_r
        self.g = 2.0 * (xc @ offset) / n + quad / (n - 1)
        tr_sqrt = np.sqrt(lam.clip(0.0)).sum()
        self.fid = float(offset @ offset + np.trace(sigma_r) + sq.sum() / (n - 1) - 2.0 * tr_sqrt)

    def __call__(self, w: np.ndarray) -> float:
        return self.fid + float((w - 1) @ self.g)


def choose_method(n: int, dim: int, n_boot: int, method: str = "auto") -> str:
    """``auto`` is ``linear``: measured here it is the closer of the two to the true seed-to-seed spread
    and costs one eigenproblem per setting instead of one per draw (module docstring)."""
    check_choice("method", method, METHODS)
    return "linear" if method == "auto" else method


def fid_replicates(
    features: np.ndarray, reference: ReferenceStats, n_boot: int = 1000, seed: int = 0, method: str = "auto"
) -> tuple[float, np.ndarray]:
    """The FID of ``features`` against ``reference`` (mu, sigma) and its ``n_boot`` bootstrap replicates.

    The estimate is the statistic at w = 1: ``metrics.fid_from_features`` up to rounding (clean-fid's
    sqrtm and the eigenvalues here agree to ~1e-8 relative: rounding of near-zero eigenvalues under the
    square root; tests/test_bootstrap.py). Reported FIDs stay metrics.py's; the replicates give the spread."""
    check_positive_int("n_boot", n_boot)
    x = np.asarray(features)  # float64 copies are made by the path (one, even for 50k x 2048)
    if x.ndim != 2 or len(x) < 2 or x.shape[1] != len(reference.mu):
        raise fail("features", f"shape {x.shape}", f"needs (N, {len(reference.mu)}) features with N >= 2")
    path = choose_method(len(x), x.shape[1], n_boot, method)
    fid = (_Exact if path == "exact" else _Linear)(x, reference.mu, reference.sigma)
    estimate = fid(np.ones(len(x), dtype=np.int64))
    return estimate, np.array([fid(w) for w in draws(len(x), n_boot, seed)])


def precision_replicates(
    features: np.ndarray, reference: ReferenceStats, n_boot: int = 1000, seed: int = 0, k: int = 3
) -> tuple[float, np.ndarray]:
    """Precision (k-NN, as ``metrics_from_features`` computes it) and its replicates: the mean of the
    per-sample indicators "inside the real manifold", redrawn with the same draws as the FID."""
    check_positive_int("n_boot", n_boot)
    inside = precision_indicators(pr_reference(reference, len(features)), features, k=k).astype(np.float64)
    n = len(inside)
    return float(inside.mean()), np.array([w @ inside / n for w in draws(n, n_boot, seed)])


# ----------------------------------------------------------------------------- one-call intervals


def fid_interval(
    features: np.ndarray,
    reference: ReferenceStats,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "auto",
) -> tuple[float, float]:
    """``level`` bootstrap interval of the FID of ``features`` (sample indices redrawn, reference fixed)."""
    check_level(level)
    fid, replicates = fid_replicates(features, reference, n_boot, seed, method)
    return interval(replicates, fid, level)


def paired_interval(
    features_a: np.ndarray,
    features_b: np.ndarray,
    reference: ReferenceStats,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "auto",
) -> tuple[float, float]:
    """``level`` interval of FID(a) − FID(b), both on the same redrawn indices each time.

    ``features_a[i]`` and ``features_b[i]`` must come from the same sample index i (common random numbers)."""
    check_level(level)
    if np.shape(features_a) != np.shape(features_b):
        raise fail("features_b", f"shape {np.shape(features_b)}", f"must match features_a {np.shape(features_a)}")
    fid_a, reps_a = fid_replicates(features_a, reference, n_boot, seed, method)
    fid_b, reps_b = fid_replicates(features_b, reference, n_boot, seed, method)
    return interval(reps_a - reps_b, fid_a - fid_b, level)


def frechet_references(reference: ReferenceStats) -> dict[str, ReferenceStats]:
    """The reference of each Fréchet metric: ``fid`` always, ``sfid`` when the statistics have spatial
    moments (the ADM extractor's, ``ReferenceStats.mu_s``/``sigma_s``)."""
    out = {"fid": reference}
    if reference.mu_s is not None:
        out["sfid"] = replace(reference, mu=reference.mu_s, sigma=reference.sigma_s)
    return out


def compare_settings(
    features: Mapping[str, Mapping[str, np.ndarray]],
    rows: Mapping[str, Mapping],
    reference: ReferenceStats,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    method: str = "auto",
) -> tuple[dict[str, dict], list[dict]]:
    """Intervals for settings scored on the same sample indices: ``({name: {"fid_ci", "precision_ci"[,
    "sfid_ci"]}}, paired)``, one ``paired`` entry ``{a, b, metric, diff: value_a − value_b, ci}`` per pair
    in order, for ``metric`` "fid" and then, when every setting has sFID features, "sfid".

    ``features[name]`` maps a Fréchet metric to its features (``Evaluator.score_with_features``):
    ``"fid"`` always, ``"sfid"`` with the ADM extractor. ``rows[name]`` holds the estimates (``fid``,
    ``sfid``, ``precision``); the replicates of every setting come from the same draws, so each pair's
    difference is paired for free."""
    check_level(level)
    names = list(features)
    for name in names:
        if not isinstance(features[name], Mapping) or "fid" not in features[name]:
            raise fail(f"features[{name!r}]", type(features[name]).__name__, 'needs a mapping {"fid": ..., ...}')
    with_sfid = all("sfid" in features[n] for n in names)  # the same extractor scored all or none of them
    references = frechet_references(reference) if with_sfid else {"fid": reference}
    out = {name: {} for name in names}
    paired = []
    for metric, ref in references.items():  # metric outermost: one reference root per metric (_ROOT)
        reps = {}
        for name in names:
            _, reps[name] = fid_replicates(features[name][metric], ref, n_boot, seed, method)
            out[name][f"{metric}_ci"] = list(interval(reps[name], rows[name][metric], level))
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                diff = rows[a][metric] - rows[b][metric]
                ci = interval(reps[a] - reps[b], diff, level)
                paired.append({"a": a, "b": b, "metric": metric, "diff": diff, "ci": list(ci)})
    for name in names:
        if math.isfinite(rows[name].get("precision", math.nan)):
            _, reps = precision_replicates(features[name]["fid"], reference, n_boot, seed)
            out[name]["precision_ci"] = list(interval(reps, rows[name]["precision"], level))
    return out, paired
