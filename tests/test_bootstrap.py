"""Bootstrap intervals over sample indices (``sgexp.eval.bootstrap``): the statistic at w = 1 is
metrics.py's FID, paired intervals of common-random-number samples are narrower than unpaired ones,
and 95% intervals of a difference cover the known answer about 95% of the time."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sgexp.eval.bootstrap import (
    choose_method,
    compare_settings,
    fid_interval,
    fid_replicates,
    interval,
    paired_interval,
    precision_replicates,
    sign,
)
from sgexp.eval.metrics import ReferenceStats, fid_from_features, metrics_from_features


def reference(dim: int, n: int = 2000, seed: int = 1) -> ReferenceStats:
    """Statistics of real features drawn from N(0, I)."""
    real = np.random.default_rng(seed).standard_normal((n, dim))
    return ReferenceStats(real.mean(0), np.cov(real, rowvar=False), real.astype(np.float32), n, "gauss", "val")


def population(dim: int) -> ReferenceStats:
    """The exact N(0, I) reference: FIDs against it have a closed form."""
    return ReferenceStats(np.zeros(dim), np.eye(dim), np.zeros((0, dim), np.float32), 0, "gauss", "val")


def fake(n: int, dim: int, shift: float = 0.3, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, dim)) * 1.2 + shift).astype(np.float32)


@pytest.mark.parametrize(
    "n,dim,method",
    [(300, 16, "exact"), (40, 64, "exact"), (300, 16, "linear"), (40, 64, "linear")],  # d x d and Gram (n < d)
)
def test_the_statistic_at_w1_is_the_fid_of_metrics(n, dim, method):
    ref, x = reference(dim), fake(n, dim)
    estimate, replicates = fid_replicates(x, ref, n_boot=50, seed=0, method=method)
    assert estimate == pytest.approx(fid_from_features(x, ref.mu, ref.sigma), rel=1e-7)
    assert len(replicates) == 50 and np.isfinite(replicates).all() and replicates.std() > 0
    lo, hi = fid_interval(x, ref, n_boot=200, seed=0, method=method)
    assert lo < estimate < hi


def test_a_redraw_is_the_fid_of_the_redrawn_features():
    """The weighted sums give exactly what copying the drawn rows and recomputing would."""
    idx = np.random.default_rng(0).integers(0, 60, 60)  # the first draw of seed 0
    for dim in (12, 64):  # d x d path; Gram path (fewer distinct indices than dimensions)
        ref, x = reference(dim), fake(60, dim)
        _, reps = fid_replicates(x, ref, n_boot=1, seed=0, method="exact")
        assert reps[0] == pytest.approx(fid_from_features(x[idx], ref.mu, ref.sigma), rel=1e-7)


def test_paired_intervals_are_narrower_on_common_random_numbers():
    ref = reference(32)
    a = fake(500, 32)
    b = a + 0.1 * np.random.default_rng(3).standard_normal(a.shape).astype(np.float32)  # same samples, nudged
    lo, hi = paired_interval(a, b, ref, n_boot=300, seed=0)
    fid_a, reps_a = fid_replicates(a, ref, n_boot=300, seed=1)
    fid_b, reps_b = fid_replicates(b, ref, n_boot=300, seed=2)  # independent draws: the unpaired interval
    ulo, uhi = interval(reps_a - reps_b, fid_a - fid_b)
    assert lo < fid_a - fid_b < hi
    assert hi - lo < 0.3 * (uhi - ulo)


def coverage(repetitions: int, n: int, dim: int, n_boot: int, method: str = "auto") -> float:
    """Fraction of paired 95% intervals of FID(a) − FID(b) that cover the population difference.

    a = Z + μ_a and b = Z + μ_b + ε E share Z (common random numbers); against N(0, I) the population
    FIDs are |μ_a|² and |μ_b|² + d (√(1 + ε²) − 1)²."""
    ref, eps = population(dim), 0.2
    mu_a, mu_b = np.full(dim, 0.25), np.full(dim, 0.2)
    truth = mu_a @ mu_a - (mu_b @ mu_b + dim * (np.sqrt(1 + eps**2) - 1) ** 2)
    hits = 0
    for r in range(repetitions):
        rng = np.random.default_rng(100 + r)
        z = rng.standard_normal((n, dim))
        a, b = z + mu_a, z + mu_b + eps * rng.standard_normal((n, dim))
        lo, hi = paired_interval(a, b, ref, n_boot=n_boot, seed=r, method=method)
        hits += lo <= truth <= hi
    return hits / repetitions


@pytest.mark.parametrize("method", ["linear", "exact"])
def test_paired_intervals_cover_the_known_difference_quickly(method):
    assert coverage(repetitions=40, n=400, dim=6, n_boot=200, method=method) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("method", ["linear", "exact"])
def test_paired_intervals_cover_the_known_difference(method):
    assert coverage(repetitions=200, n=1000, dim=8, n_boot=1000, method=method) >= 0.9


def test_linear_and_exact_intervals_agree_on_many_samples():
    ref, x = reference(16), fake(3000, 16)
    exact, linear = (fid_interval(x, ref, n_boot=300, seed=0, method=m) for m in ("exact", "linear"))
    width = exact[1] - exact[0]
    assert abs(exact[0] - linear[0]) < 0.15 * width and abs(exact[1] - linear[1]) < 0.15 * width
    assert choose_method(1000, 2048, 1000) == "linear" and choose_method(50, 8, 10, "exact") == "exact"


def test_precision_replicates_resample_the_metrics_indicators():
    ref, x = reference(8, n=300), fake(300, 8)
    estimate, reps = precision_replicates(x, ref, n_boot=200, seed=0)
    assert estimate == metrics_from_features(x, None, None, ref)["precision"]
    lo, hi = interval(reps, estimate)
    assert 0 <= lo < estimate < hi <= 1


def test_compare_settings_gives_every_row_and_pair():
    ref = reference(8, n=300)
    feats = {"a": fake(200, 8, seed=4), "b": fake(200, 8, shift=0.6, seed=4), "c": fake(200, 8, seed=4)}
    rows = {k: metrics_from_features(v, None, None, ref) for k, v in feats.items()}
    cis, paired = compare_settings({k: {"fid": v} for k, v in feats.items()}, rows, ref, n_boot=200, seed=0)
    for name, row in rows.items():
        assert cis[name]["fid_ci"][0] < row["fid"] < cis[name]["fid_ci"][1]
        assert cis[name]["precision_ci"][0] <= row["precision"] <= cis[name]["precision_ci"][1]
    assert [(p["a"], p["b"]) for p in paired] == [("a", "b"), ("a", "c"), ("b", "c")]
    by_pair = {(p["a"], p["b"]): p for p in paired}
    assert by_pair["a", "b"]["diff"] == rows["a"]["fid"] - rows["b"]["fid"]
    assert sign(by_pair["a", "b"]["ci"]) == -1  # b is shifted further from the reference: a is clearly lower
    assert by_pair["a", "c"]["diff"] == 0 and by_pair["a", "c"]["ci"] == [0.0, 0.0]  # the same samples


def test_compare_settings_gives_sfid_intervals_from_the_spatial_statistics():
    """With sFID features and the reference's spatial moments, every row gets ``sfid_ci`` and every
    pair a ``metric: "sfid"`` entry: the FID bootstrap against (mu_s, sigma_s)."""
    pool, spatial = reference(8, n=300), reference(12, n=300, seed=5)
    ref = replace(pool, mu_s=spatial.mu, sigma_s=spatial.sigma)
    feats = {
        "a": {"fid": fake(200, 8, seed=4), "sfid": fake(200, 12, seed=6)},
        "b": {"fid": fake(200, 8, shift=0.6, seed=4), "sfid": fake(200, 12, shift=0.6, seed=6)},
    }
    rows = {
        k: {
            **metrics_from_features(v["fid"], None, None, ref),
            "sfid": fid_from_features(v["sfid"], ref.mu_s, ref.sigma_s),
        }
        for k, v in feats.items()
    }
    cis, paired = compare_settings(feats, rows, ref, n_boot=200, seed=0)
    for name, row in rows.items():
        assert cis[name]["sfid_ci"][0] < row["sfid"] < cis[name]["sfid_ci"][1]
        assert cis[name]["fid_ci"][0] < row["fid"] < cis[name]["fid_ci"][1]
        assert "recall_ci" not in cis[name]  # no sound bootstrap for recall (module docstring)
        spatial_ref = replace(ref, mu=ref.mu_s, sigma=ref.sigma_s)
        assert cis[name]["sfid_ci"] == pytest.approx(fid_interval(feats[name]["sfid"], spatial_ref, n_boot=200))
    assert [(p["a"], p["b"], p["metric"]) for p in paired] == [("a", "b", "fid"), ("a", "b", "sfid")]
    sfid = paired[1]
    assert sfid["diff"] == rows["a"]["sfid"] - rows["b"]["sfid"] and sign(sfid["ci"]) == -1
    # without spatial statistics (or features) there is no sFID: FID and precision as before
    cis, paired = compare_settings({k: {"fid": v["fid"]} for k, v in feats.items()}, rows, pool, n_boot=50)
    assert "sfid_ci" not in cis["a"] and [p["metric"] for p in paired] == ["fid"]
    with pytest.raises(ValueError, match=r"features\['a'\]='ndarray' is invalid: needs a mapping"):
        compare_settings({"a": feats["a"]["fid"]}, rows, pool, n_boot=10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"level": 1.5}, r"level=1.5 is invalid"),
        ({"n_boot": 0}, r"n_boot=0 is invalid"),
        ({"method": "fast"}, r"method='fast' is invalid"),
    ],
)
def test_bad_input(kwargs, match):
    ref, x = reference(4, n=50), fake(20, 4)
    with pytest.raises(ValueError, match=match):
        fid_interval(x, ref, **kwargs)
    with pytest.raises(ValueError, match="features_b=.* is invalid: must match"):
        paired_interval(x, x[:10], ref)


def test_claims_decide_from_the_paired_interval_when_rows_carry_one():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `reproduce` is a folder, not a package
    from reproduce import claims

    a = {"setting": "cfg", "fid": 60.0, "paired": {"sg": {"diff": 3.0, "ci": [1.0, 5.0]}}}
    b = {"setting": "sg", "fid": 57.0, "paired": {"cfg": {"diff": -3.0, "ci": [-5.0, -1.0]}}}
    assert claims.paired_ci(a, b) == [1.0, 5.0] and claims.paired_ci(a, {"setting": "x"}) is None
    # 3 FID at 1,000 samples is within the ±5 noise rule, but the paired interval excludes 0
    assert claims.verdict(3.0, 1000).startswith("**inconclusive**")
    assert claims.verdict(3.0, 1000, claims.paired_ci(a, b)).startswith("**holds** (difference +3.0")
    assert claims.verdict(-3.0, 1000, claims.paired_ci(b, a)).startswith("**does not hold**")
    assert claims.verdict(8.0, 1000, [-1.0, 17.0]).startswith("**inconclusive**")
