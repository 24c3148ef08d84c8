"""A stored sweep study in optuna-dashboard: ``python -m sgexp.sweeps dashboard`` serves the study's journal
on 127.0.0.1 and optuna-dashboard's own HTTP API shows its trials under the metric names the sweeps set
(``study.set_metric_names``), its Pareto front the one ``report.pareto_trials`` reports. Real journal
storage, a real server subprocess, real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest
from conftest import ROOT, free_port
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sgexp.sweeps import cli, report
from sgexp.sweeps.storage import open_storage
from sgexp.sweeps.study import name_objectives

pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is a dev extra: pip install -e '.[dev]'")

POINTS = [(40.0, 4.0), (30.0, 6.0), (45.0, 6.5), (20.0, 9.0), (35.0, 3.0)]  # (FID, GFLOPs): 0 and 2 dominated


def stored_study(path) -> optuna.Study:
    """A two-objective journal study as the driver leaves it, minus the metric names (an old study)."""
    study = optuna.create_study(storage=open_storage(str(path)), study_name="s", directions=["minimize"] * 2)
    study.set_user_attr("config", {"objectives": ["fid", "gflops_per_sample"], "n_trials": len(POINTS) + 1})
    for i, values in enumerate(POINTS):
        trial = create_trial(
            values=list(values),
            params={"scale": 1.0 + i},
            distributions={"scale": FloatDistribution(1.0, 8.0)},
            user_attrs={"family": "sg"},
        )
        study.add_trial(trial)
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "test"}))
    return study


def get(url: str, deadline: float) -> dict:
    """GET ``url`` as JSON, retrying until the server answers or ``deadline`` (time.monotonic) passes."""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_name_objectives(tmp_path):
    study = stored_study(tmp_path / "study.log")
    assert study.metric_names is None
    assert name_objectives(study) == ["fid", "gflops_per_sample"]  # from the stored config
    again = optuna.load_study(study_name="s", storage=open_storage(str(tmp_path / "study.log")))
    assert again.metric_names == ["fid", "gflops_per_sample"]  # in the storage, for every reader
    assert name_objectives(again, ["fid", "seconds_per_sample"]) == ["fid", "seconds_per_sample"]
    with pytest.raises(ValueError, match="objectives"):
        name_objectives(again, ["fid"])


def test_dashboard_serves_the_study_with_its_metric_names(tmp_path):
    path = tmp_path / "study.log"
    study = stored_study(path)
    port = free_port()
    command = [sys.executable, "-m", "sgexp.sweeps", "dashboard", "--study", "s", "--storage", str(path)]
    server = subprocess.Popen(
        [*command, "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        studies = get(f"{base}/api/studies", time.monotonic() + 60)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["s"]
        detail = get(f"{base}/api/studies/{studies[0]['study_id']}", time.monotonic() + 10)
        assert detail["objective_names"] == ["fid", "gflops_per_sample"]
        trials = {t["number"]: t for t in detail["trials"]}
        assert len(trials) == len(POINTS) + 1 and trials[len(POINTS)]["state"] == "Fail"
        assert [trials[i]["values"] for i in range(len(POINTS))] == [list(p) for p in POINTS]
        best = sorted(t["number"] for t in detail["best_trials"])
        assert best == sorted(t.number for t in report.pareto_trials(study)) == [1, 3, 4]
        with urllib.request.urlopen(f"{base}/dashboard/", timeout=5) as page:  # the app itself
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard/" in out


def test_dashboard_refuses_a_missing_study_or_storage(tmp_path):
    stored_study(tmp_path / "study.log")
    with pytest.raises(ValueError, match=r"study=.*holds \['s'\]"):
        cli.main(["dashboard", "--study", "other", "--storage", str(tmp_path / "study.log")])
    with pytest.raises(ValueError, match="no such journal file"):
        cli.main(["dashboard", "--study", "s", "--storage", str(tmp_path / "none.log")])
    with pytest.raises(ValueError, match="port"):
        cli.main(["dashboard", "--study", "s", "--storage", str(tmp_path / "study.log"), "--port", "70000"])
    assert not (tmp_path / "none.log").exists()  # nothing created by a wrong path
