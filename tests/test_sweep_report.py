"""The study report against real Optuna studies and a real MLflow sqlite store (no mocks).

The synthetic study mimics what the driver records: CFG points along a curve (guidance scale × guidance
interval), SG points scattered over (γ_strong, γ_weak) with a FID valley near (0.5, 0.8), an unguided
baseline, a CFG baseline that repeats a sampled CFG point exactly (a tie on the front), a few CFG+SG
points and FAIL trials. ``sg_offset`` shifts every SG FID: 0 lets SG beat the best CFG at fewer FLOPs,
+25 makes it lose, so the report's answer is known in both cases.
"""

from __future__ import annotations

import csv
import json
import os
import time

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna._hypervolume import compute_hypervolume
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState, create_trial
from PIL import Image

from sgexp.sweeps import report

DENSE = 10.0  # GFLOPs/sample of one dense pass over all sampling steps
ROUTE = 0.6  # fraction of a pass's FLOPs inside the route
FILES = {
    "pareto.png",
    "pareto.html",
    "pareto.csv",
    "trials.csv",
    "hypervolume.csv",
    "hypervolume.png",
    "heatmaps.png",
    "summary.json",
}
DISTS = {
    "family": CategoricalDistribution(["none", "cfg", "sg", "cfg_sg"]),
    "scale": FloatDistribution(1.0, 10.0),
    "interval": FloatDistribution(0.25, 1.0),
    "gamma_strong": FloatDistribution(0.0, 0.95),
    "gamma_weak": FloatDistribution(0.0, 0.95),
}


def brute_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point dominates (minimisation)."""
    dominated = lambda a, b: a[0] <= b[0] and a[1] <= b[1] and a != b  # a dominates b
    return [i for i, p in enumerate(points) if not any(dominated(q, p) for q in points)]


def synthetic_specs(sg_offset: float = 0.0, n_sg: int = 40) -> list[dict]:
    """Trial specs in trial-number order: ``state``, ``values``, ``params``, ``attrs``."""
    rng = np.random.default_rng(0)
    specs = []

    def add(family: str, fid: float, gflops: float, baseline: bool = False, **params: float) -> None:
        fid, gflops = round(fid, 4), round(gflops, 4)
        setting = {"family": family, **params}
        attrs = {
            "family": family,
            "baseline": baseline,
            "setting": setting,
            "scale": params.get("scale", 1.0),
            "gamma_strong": params.get("gamma_strong", 0.0),
            "gamma_weak": params.get("gamma_weak", 0.0),
            "fid": fid,
            "precision": 0.7,
            "recall": 0.5,
            "gflops_per_sample": gflops,
            "relative_to_cfg": gflops / (2 * DENSE),
            "seconds_per_sample": gflops / 1000,
            "num_samples": 1000,
            "mlflow_run_id": f"run{len(specs)}",
            "worker": 0,
        }
        specs.append(
            {
                "state": TrialState.COMPLETE,
                "values": [fid, gflops],
                "params": {"family": family, **params},
                "attrs": attrs,
            }
        )

    add("none", 104.0, DENSE, baseline=True)
    for w in (1.25, 1.5, 2.0, 2.5, 3.0):  # CFG: cost grows with the guided fraction of the steps
        for interval in (0.5, 0.75, 1.0):
            fid = 57 + 12 * (w - 1.5) ** 2 + 25 * (1 - interval)
            add("cfg", fid, DENSE * (1 + interval), scale=w, interval=interval)
    add("cfg", 57.0, 2 * DENSE, baseline=True, scale=1.5, interval=1.0)  # the same values as a sampled trial
    for i in range(n_sg):
        gs, gw = sorted(rng.uniform(0.0, 0.95, size=2))
        w = float(rng.choice([1.5, 3.0, 5.0, 8.0]))
        fid = 42 + 120 * (gw - 0.8) ** 2 + 80 * (gs - 0.5) ** 2 + 40 / w + sg_offset
        add("sg", fid, DENSE * (2 - ROUTE * (gs + gw)), scale=w, gamma_strong=round(gs, 3), gamma_weak=round(gw, 3))
        if i % 10 == 3:  # a failed trial now and then
            specs.append(
                {
                    "state": TrialState.FAIL,
                    "values": None,
                    "params": {"family": "sg"},
                    "attrs": {"family": "sg", "fail_reason": "RuntimeError: out of memory"},
                }
            )
    for gw in (0.5, 0.7):
        add("cfg_sg", 60 + 20 * gw, DENSE * (2 - ROUTE * gw), scale=1.5, gamma_strong=0.0, gamma_weak=gw)

    # The driver re-evaluates the Pareto trials with more samples.
    complete = [i for i, s in enumerate(specs) if s["state"] == TrialState.COMPLETE]
    for j in brute_front([tuple(specs[i]["values"]) for i in complete]):
        attrs = specs[complete[j]]["attrs"]
        attrs.update(fid_final=attrs["fid"] + 1.5, num_samples_final=5000, precision_final=0.71, recall_final=0.52)
    return specs


def make_study(specs: list[dict], storage=None, name: str = "synthetic") -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "minimize"], storage=storage, study_name=name)
    study.set_user_attr("metric", "domain FID (mnist5k classifier)")
    study.set_user_attr("samples_per_trial", 1000)
    study.set_user_attr("final_samples", 5000)
    study.set_user_attr("checkpoint", "runs/mnist_tread/x/checkpoints/last.ckpt")
    for s in specs:
        dists = {k: DISTS[k] for k in s["params"]}
        study.add_trial(
            create_trial(
                state=s["state"], values=s["values"], params=s["params"], distributions=dists, user_attrs=s["attrs"]
            )
        )
    return study


def expected_answer(specs: list[dict]) -> tuple[int, int | None]:
    """(best CFG trial, best SG trial that beats it on both objectives or None), brute force."""
    done = [(i, s["values"], s["attrs"]["family"]) for i, s in enumerate(specs) if s["state"] == TrialState.COMPLETE]
    cfg = min((v[0], v[1], i) for i, v, f in done if f == "cfg")
    wins = [(v[0], v[1], i) for i, v, f in done if f == "sg" and v[0] < cfg[0] and v[1] < cfg[1]]
    return cfg[2], (min(wins)[2] if wins else None)


@pytest.fixture(params=[0.0, 25.0], ids=["sg-wins", "sg-loses"])
def case(request, tmp_path):
    """(specs, study in a journal file) for SG winning and losing against the best CFG."""
    specs = synthetic_specs(request.param)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "study.log")))
    return specs, make_study(specs, storage)


@pytest.fixture(autouse=True)
def no_global_mlflow_state():
    """The report must not change mlflow's process-wide tracking URI."""
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    yield
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before


def test_pareto_trials_match_brute_force_and_optuna(case):
    specs, study = case
    complete = [i for i, s in enumerate(specs) if s["state"] == TrialState.COMPLETE]
    expected = sorted(complete[j] for j in brute_front([tuple(specs[i]["values"]) for i in complete]))
    front = report.pareto_trials(study)
    assert sorted(t.number for t in front) == expected == sorted(t.number for t in study.best_trials)
    assert [t.values[1] for t in front] == sorted(t.values[1] for t in front)
    assert [t.values[0] for t in front] == sorted((t.values[0] for t in front), reverse=True)
    assert all(t.state == TrialState.COMPLETE for t in front)


def test_pareto_trials_skip_non_finite_values():
    """Optuna's front over a study with a -inf FID (not one the driver writes) would be that trial alone;
    the report's front is that of the finite trials, as before it used ``study.best_trials``."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in ([3.0, 1.0], [2.0, 2.0], [float("-inf"), 1.5], [1.0, 3.0], [2.5, 2.5]):
        study.add_trial(create_trial(values=values))
    assert sorted(t.number for t in study.best_trials) == [0, 2]  # -inf at 1.5 GFLOPs dominates 1 and 3
    assert [t.number for t in report.pareto_trials(study)] == [0, 1, 3]
    study.add_trial(create_trial(values=[0.5, 10.0]))
    assert [t.number for t in report.pareto_trials(study)] == [0, 1, 3, 5]


def test_pareto_keeps_ties():
    specs = synthetic_specs(25.0)  # SG loses: the best CFG point and its identical baseline are both on the front
    numbers = {t.number for t in report.pareto_trials(make_study(specs))}
    tied = [i for i, s in enumerate(specs) if s["values"] == [57.0, 2 * DENSE]]
    assert len(tied) == 2 and set(tied) <= numbers


def test_hypervolume_hand_computed():
    assert report.hypervolume_2d([(1, 3), (2, 2), (3, 1)], (4, 4)) == pytest.approx(3 + 2 + 1)
    # dominated, duplicate and outside-the-reference points add nothing
    assert report.hypervolume_2d([(1, 3), (2, 2), (3, 1), (3, 3), (2, 2), (5, 0), (0, 4)], (4, 4)) == pytest.approx(6)
    assert report.hypervolume_2d([], (4, 4)) == 0.0

    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = {"x": FloatDistribution(0, 1)}
    for values in ([1, 3], [3, 1], None, [2, 2], [3, 3]):
        state = TrialState.FAIL if values is None else TrialState.COMPLETE
        study.add_trial(create_trial(state=state, values=values, params={"x": 0.5}, distributions=dist))
    assert report.hypervolume_history(study, (4, 4)) == [(0, 3.0), (1, 5.0), (2, 5.0), (3, 6.0), (4, 6.0)]
    assert report.default_reference_point(study) == pytest.approx((3.3, 3.3))


def test_hypervolume_history_matches_optuna(case):
    specs, study = case
    ref = report.default_reference_point(study)
    values = [s["values"] for s in specs if s["state"] == TrialState.COMPLETE]
    assert ref == pytest.approx((1.1 * max(v[0] for v in values), 1.1 * max(v[1] for v in values)))
    history = report.hypervolume_history(study)
    assert [n for n, _ in history] == list(range(len(specs)))  # every finished trial, FAIL included
    hv = [v for _, v in history]
    assert all(b >= a for a, b in zip(hv, hv[1:], strict=False)) and hv[-1] > 0
    for number, value in history[::7] + history[-1:]:
        points = np.array([s["values"] for s in specs[: number + 1] if s["state"] == TrialState.COMPLETE])
        assert value == pytest.approx(compute_hypervolume(points, np.array(ref)), rel=1e-9)


def test_pareto_table(case):
    specs, study = case
    table = report.pareto_table(study)
    assert [r["number"] for r in table] == [t.number for t in report.pareto_trials(study)]
    for row in table:
        spec = specs[row["number"]]
        assert set(report.TABLE_COLUMNS) <= set(row)
        assert (row["fid"], row["gflops_per_sample"]) == tuple(spec["values"])
        assert row["family"] == spec["attrs"]["family"] and row["scale"] == spec["attrs"]["scale"]
        assert row["fid_final"] == pytest.approx(row["fid"] + 1.5) and row["num_samples_final"] == 5000
        assert row["class_accuracy"] is None  # optional attribute absent: None, not an error


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_cell(cell: str, value) -> bool:
    if value is None:
        return cell == ""
    if isinstance(value, dict):
        return json.loads(cell) == value
    if isinstance(value, bool | str):
        return cell == str(value)
    return float(cell) == value


def test_write_report_files_and_answer(case, tmp_path):
    specs, study = case
    files = report.write_report(study, tmp_path / "report", None, None)
    assert set(files) == FILES and all(p.is_file() and p.parent == tmp_path / "report" for p in files.values())
    for name in ("pareto.png", "hypervolume.png", "heatmaps.png"):
        with Image.open(files[name]) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 200
    html = files["pareto.html"].read_text()
    assert "plotly" in html.lower() and "Pareto front" in html and "trial 1: CFG w=1.25" in html

    table = report.pareto_table(study)
    rows = read_csv(files["pareto.csv"])
    assert len(rows) == len(table)
    assert all(same_cell(r[c], t[c]) for r, t in zip(rows, table, strict=True) for c in report.TABLE_COLUMNS)
    trials = read_csv(files["trials.csv"])
    assert [int(r["number"]) for r in trials] == list(range(len(specs)))
    failed = [r for r in trials if r["state"] == "FAIL"]
    assert len(failed) == 4 and all(r["fail_reason"].startswith("RuntimeError") and r["fid"] == "" for r in failed)
    hv = read_csv(files["hypervolume.csv"])
    assert [(int(r["number"]), float(r["hypervolume"])) for r in hv] == report.hypervolume_history(study)

    summary = json.loads(files["summary.json"].read_text())
    cfg, sg = expected_answer(specs)
    answer = summary["sg_beats_best_cfg"]
    assert summary["metric"] == "domain FID (mnist5k classifier)" and summary["study"] == "synthetic"
    assert summary["n_trials_by_state"] == {"COMPLETE": len(specs) - 4, "FAIL": 4}
    assert summary["best_cfg"]["number"] == answer["best_cfg"]["number"] == cfg
    assert answer["answer"] is (sg is not None)
    assert (answer["point"] or {}).get("number") == sg
    if sg is not None:  # the winner is cheaper and better, as the question asks
        assert answer["point"]["fid"] < answer["best_cfg"]["fid"]
        assert answer["point"]["gflops_per_sample"] < answer["best_cfg"]["gflops_per_sample"]
    assert [r["number"] for r in summary["pareto"]] == [r["number"] for r in table]
    assert summary["hypervolume"]["final"] == pytest.approx(report.hypervolume_history(study)[-1][1])


def test_answer_is_known_in_both_cases():
    assert expected_answer(synthetic_specs(0.0))[1] is not None
    assert expected_answer(synthetic_specs(25.0))[1] is None


def test_report_on_small_studies(tmp_path):
    """Few SG trials: no heatmaps (and a note); only FAIL trials: every other file is still written."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "heatmaps.png").write_bytes(b"stale")  # from an earlier report of a larger study
    study = make_study(synthetic_specs(0.0, n_sg=2))
    study.set_user_attr("config", {"objectives": ["fid", "seconds_per_sample"]})
    files = report.write_report(study, tmp_path / "a", None, None)
    assert set(files) == FILES - {"heatmaps.png"} and not (tmp_path / "a" / "heatmaps.png").exists()
    notes = json.loads(files["summary.json"].read_text())["notes"]
    assert "objectives are ['fid', 'seconds_per_sample']" in notes[0] and "heatmaps.png skipped" in notes[1]

    failed = [{"state": TrialState.FAIL, "values": None, "params": {}, "attrs": {"fail_reason": "RuntimeError: x"}}]
    files = report.write_report(make_study(failed, name="failed"), tmp_path / "b", None, None)
    summary = json.loads(files["summary.json"].read_text())
    assert summary["pareto"] == [] and summary["sg_beats_best_cfg"]["answer"] is None
    assert report.hypervolume_history(make_study(failed)) == [(0, 0.0)]


def test_write_report_logs_artifacts_to_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sweep", artifact_location=str(tmp_path / "mlartifacts"))
    run_id = client.create_run(experiment, run_name="study").info.run_id
    files = report.write_report(make_study(synthetic_specs(0.0)), tmp_path / "report", uri, run_id)
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert logged == {f"report/{name}" for name in files} and len(files) == len(FILES)
    local = client.download_artifacts(run_id, "report/summary.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read())["sg_beats_best_cfg"]["answer"] is True


def test_paired_intervals_decide_against_the_best_cfg(tmp_path):
    """With paired intervals recorded, a cheaper point must be *significantly* better than the best CFG
    point; without them the screening FIDs decide as before."""

    def spec(family: str, fid: float, gflops: float, scale: float, gs: float = 0.0, gw: float = 0.0) -> dict:
        point = {"scale": scale, "gamma_strong": gs, "gamma_weak": gw}
        attrs = {"family": family, "setting": {"family": family, **point}, **point, "fid": fid, "num_samples": 1000}
        attrs.update(gflops_per_sample=gflops, relative_to_cfg=gflops / 2.0)
        return {"state": TrialState.COMPLETE, "values": [fid, gflops], "params": {}, "attrs": attrs}

    specs = [
        spec("cfg", 50.0, 2.0, 1.5),
        spec("sg", 45.0, 1.5, 5.0, 0.5, 0.9),
        spec("sg", 48.0, 1.2, 3.0, 0.25, 0.75),
        spec("sg", 40.0, 2.5, 8.0, 0.0, 0.5),  # better but dearer: not a candidate
    ]
    study = make_study(specs, name="paired")
    plain = report.compare_to_best_cfg([report._row(t) for t in report._complete(study)])
    assert plain["point"]["number"] == 1 and plain["decided_by"] == ["point estimate"]
    study.set_user_attr(
        report.PAIRED_ATTR,
        [
            {"a": 1, "b": 0, "metric": "fid", "diff": -5.0, "ci": [-12.0, 1.0]},  # contains 0: inconclusive
            {"a": 0, "b": 2, "metric": "fid", "diff": 2.0, "ci": [0.5, 3.5]},  # CFG clearly worse than trial 2
        ],
    )
    paired = report.paired_intervals(study)
    assert paired[2, 0] == {"diff": -2.0, "ci": [-3.5, -0.5]}
    files = report.write_report(study, tmp_path / "report", None, None)
    answer = json.loads(files["summary.json"].read_text())["sg_beats_best_cfg"]
    assert answer["answer"] is True and answer["point"]["number"] == 2  # not trial 1, despite its lower FID
    assert answer["n_better"] == 1 and answer["n_inconclusive"] == 1
    assert answer["decided_by"] == ["paired interval"] and answer["point_paired"]["ci"] == [-3.5, -0.5]


def test_array_progress_prints_changes_and_a_line_per_period(tmp_path):
    """What ``--slurm-array K --wait`` prints while it waits, from squeue's task states and the study."""
    import io

    from rich.console import Console

    from sgexp.sweeps.progress import ArrayProgress

    specs = synthetic_specs()
    study = make_study(specs)
    study.set_user_attr("config", {"n_trials": 80})
    out = io.StringIO()
    progress = ArrayProgress(Console(file=out, width=200), 4, study, period=0.2)
    progress(["PENDING"] * 4)
    progress(["PENDING"] * 4)  # unchanged within the period: silent
    progress(["RUNNING", "RUNNING", "PENDING"])
    time.sleep(0.3)
    progress(["RUNNING", "RUNNING", "PENDING"])  # unchanged, but the period passed: a line
    lines = out.getvalue().splitlines()
    done = sum(s["state"] == TrialState.COMPLETE or not s["attrs"].get("requeued") for s in specs)
    assert len(lines) == 3
    assert lines[0].endswith(f"synthetic: 4 queued, 0 running, 0 finished of 4 tasks; trials {done}/80 done, 0 running")
    assert "1 queued, 2 running, 1 finished of 4 tasks" in lines[1] and lines[1][9:] == lines[2][9:]
