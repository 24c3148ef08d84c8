"""The finalists' intervals of a sweep: FID and sFID, each finalist's own and the paired differences.

The features are Gaussian with known shifts and the reference is fixed, so the test checks the
plumbing from kept features to the study attributes and the report (``pareto.csv``, ``summary.json``)
against ``sgexp.eval.bootstrap`` computed directly on the same arrays."""

from __future__ import annotations

import csv
import json

import numpy as np
import optuna
import pytest
from omegaconf import OmegaConf

from sgexp.eval.bootstrap import compare_settings
from sgexp.eval.metrics import ReferenceStats, fid_from_features
from sgexp.sweeps.fidelity import feature_file, final_view, pair_finalists
from sgexp.sweeps.report import write_report

N, DIM, SPATIAL = 300, 6, 5


def gaussian_reference(rng: np.random.Generator) -> ReferenceStats:
    pool, spatial = rng.normal(size=(3000, DIM)), rng.normal(size=(3000, SPATIAL))
    return ReferenceStats(
        pool.mean(0),
        np.cov(pool, rowvar=False),
        pool[:500].astype(np.float32),
        3000,
        "gaussian",
        "val",
        mu_s=spatial.mean(0),
        sigma_s=np.cov(spatial, rowvar=False),
    )


def test_finalists_get_fid_and_sfid_intervals_and_paired_differences_in_the_report(tmp_path):
    rng = np.random.default_rng(0)
    reference = gaussian_reference(rng)
    study = optuna.create_study(directions=["minimize", "minimize"])
    features = {}
    # trial 0: CFG (worse, dearer); trial 1: SG (better, cheaper). Both are finalists: the front and the best CFG.
    for number, (family, shift, gflops) in enumerate([("cfg", 0.4, 2.0), ("sg", 0.1, 1.0)]):
        pool, spatial = rng.normal(shift, 1, (N, DIM)), rng.normal(shift, 1, (N, SPATIAL))
        fid = fid_from_features(pool, reference.mu, reference.sigma)
        sfid = fid_from_features(spatial, reference.mu_s, reference.sigma_s)
        study.add_trial(optuna.trial.create_trial(values=[fid, gflops], user_attrs={"family": family}))
        study.set_user_attr(f"final/{number}", {"fid_final": fid, "sfid_final": sfid, "num_samples_final": N})
        np.save(feature_file(tmp_path, number, "fid"), pool)
        np.save(feature_file(tmp_path, number, "sfid"), spatial)
        features[number] = ({"fid": pool, "sfid": spatial}, {"fid": fid, "sfid": sfid, "precision": float("nan")})

    cfg = OmegaConf.create({"final_samples": N, "seed": 0, "bootstrap": 200})
    pair_finalists(study, cfg, reference, tmp_path)

    expected_cis, expected_paired = compare_settings(
        {n: f for n, (f, _) in features.items()}, {n: r for n, (_, r) in features.items()}, reference, 200, 0.95, 0
    )
    for number in (0, 1):
        final = study.user_attrs[f"final/{number}"]
        assert final["fid_final_ci"] == expected_cis[number]["fid_ci"]
        assert final["sfid_final_ci"] == expected_cis[number]["sfid_ci"]
        low, high = final["sfid_final_ci"]
        assert low <= final["sfid_final"] <= high
    paired = {p["metric"]: p for p in study.user_attrs["paired"]}
    assert set(paired) == {"fid", "sfid"}
    for metric, entry in paired.items():
        assert (entry["a"], entry["b"], entry["num_samples"]) == (0, 1, N)
        assert entry["diff"] == pytest.approx(features[0][1][metric] - features[1][1][metric])
        assert entry["ci"] == next(e["ci"] for e in expected_paired if e["metric"] == metric)
        assert entry["ci"][0] > 0  # shifts 0.4 vs 0.1 on 300 samples: SG clearly better on both metrics

    files = write_report(final_view(study), tmp_path / "report")
    with open(files["pareto.csv"]) as f:
        (sg_row,) = list(csv.DictReader(f))  # SG dominates: the front is trial 1 alone
    assert sg_row["number"] == "1"
    assert json.loads(sg_row["sfid_final_ci"]) == study.user_attrs["final/1"]["sfid_final_ci"]
    summary = json.loads(files["summary.json"].read_text())
    assert summary["pareto"][0]["fid_final_ci"] == study.user_attrs["final/1"]["fid_final_ci"]
    assert summary["sg_beats_best_cfg"]["decided_by"] == ["paired interval"]  # FID's interval, not sFID's
