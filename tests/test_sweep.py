"""``python -m sgexp.sweeps`` on a real (tiny) digits checkpoint: the study runs to its budget, resumes after
a SIGKILL, shares its storage between workers, survives failing trials and refuses bad input before any
trial. Real Optuna journal files, real MLflow sqlite stores, real sampling and FID."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ROOT, compose_train, digits_run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.search_space import intersection_search_space
from optuna.trial import TrialState

from sgexp.data import ensure_prepared
from sgexp.eval import evaluator, train_classifier
from sgexp.sweeps import cli
from sgexp.sweeps.space import InSpaceSampler, SearchSpace, make_sampler
from sgexp.sweeps.storage import STALE, Heartbeat, counts, last_beat, open_storage, reap_stale, release
from sgexp.sweeps.study import frozen_config, load_study
from sgexp.train import run as train

REPORT_FILES = {"pareto.png", "pareto.html", "pareto.csv", "summary.json"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two torch threads on two cores that something else also uses run ~40x slower than one (spin-waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits model trained for a few steps, a (barely trained) digits classifier for domain FID, and the
    MLflow store every study of this module shares (created once: its migrations take seconds)."""
    tmp = tmp_path_factory.mktemp("sweep")
    shards = tmp / "shards"
    train_classifier(ensure_prepared("digits", shards), epochs=1)
    result = train(
        compose_train(digits_run(tmp, shards, "trainer.max_steps=4", "callbacks.guided_eval.num_samples=10"))
    )
    return shards, result, f"sqlite:///{tmp / 'mlflow.db'}"


def cli_args(trained, tmp: Path, *extra: str, n_trials: int = 9, samples: int = 24, steps: int = 3) -> list[str]:
    """A tiny sparsity_pareto study (6 baselines + sampled SG points) in ``tmp``."""
    shards, result, tracking_uri = trained
    sets = [
        f"checkpoint={result.checkpoint}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp / 'runs'}",
        f"sampler.steps={steps}",
        "batch_size=48",
        "grid_size=10",
        "optuna.n_startup_trials=2",
        "heartbeat.interval=0.5",
        "heartbeat.timeout=3",
    ]
    args = ["--study", "sparsity_pareto", "--storage", str(tmp / "study.log")]
    args += ["--tracking-uri", tracking_uri, "--n-trials", str(n_trials)]
    args += ["--samples", str(samples), "--final-samples", str(2 * samples)]
    for item in sets:
        args += ["--set", item]
    return [*args, *extra]


def load(tmp: Path, name: str = "sparsity_pareto") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(str(tmp / "study.log")))


def key(trial) -> str:
    return json.dumps(trial.user_attrs["setting"], sort_keys=True)


def test_study_end_to_end_and_resume_of_a_finished_study(trained, tmp_path, capsys):
    summary = cli.main(cli_args(trained, tmp_path))
    study = load(tmp_path)
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 9
    # Baselines first: unguided and CFG as fixed points (no params), SG(0.5, 0.9) inside the space.
    baselines = [t for t in trials if t.user_attrs["baseline"]]
    assert [t.number for t in baselines] == list(range(6))
    assert [(t.user_attrs["family"], t.user_attrs["scale"]) for t in baselines] == [
        ("none", 1.0),
        ("cfg", 1.5),
        ("cfg", 2.0),
        ("cfg", 3.0),
        ("sg", 1.5),
        ("sg", 5.0),
    ]
    assert all(not t.params for t in baselines[:4]) and all(t.params for t in baselines[4:])
    for t in trials:
        a = t.user_attrs
        assert t.values == [a["fid"], a["gflops_per_sample"]] and math.isfinite(a["fid"])
        assert a["seed"] == 0 and a["num_samples"] == 24  # the same samples for every trial
        assert Path(a["grid"]).is_file() and a["worker"].endswith(f":{os.getpid()}")
        if a["family"] == "sg":
            assert 0 <= a["gamma_strong"] < a["gamma_weak"] <= 0.95 and 1 <= a["scale"] <= 8
        if t.params:  # γ_w is recorded, u is what was sampled
            gs, u = t.params["gamma_strong"], t.params["gamma_weak_fraction"]
            assert a["gamma_weak"] == pytest.approx(gs + u * (0.95 - gs))
    assert {a.user_attrs["family"] for a in trials[6:]} == {"sg"}
    assert study.user_attrs["samples_per_trial"] == 24 and "domain FID" in study.user_attrs["metric"]

    # The Pareto set was re-scored on 48 samples; the view carries the *_final attributes.
    from sgexp.sweeps.report import pareto_trials

    front = pareto_trials(summary["view"])
    assert front and all(t.user_attrs["num_samples_final"] == 48 for t in front)
    assert all(math.isfinite(t.user_attrs["fid_final"]) for t in front)
    # The finalists are the Pareto set and the best CFG trial (the study's yardstick), all on the same 48
    # indices: every pair of them has a paired FID interval, and the summary decides by those.
    from sgexp.sweeps.fidelity import finalists

    finals = {int(k.split("/")[1]) for k in study.user_attrs if k.startswith("final/")}
    assert {t.number for t in front} <= finals == {t.number for t in finalists(study)}
    best_cfg = min((t for t in trials if t.user_attrs["family"] == "cfg"), key=lambda t: (t.values[0], t.number))
    assert best_cfg.number in finals
    paired = study.user_attrs["paired"]
    assert {(p["a"], p["b"]) for p in paired} == {(a, b) for a in sorted(finals) for b in sorted(finals) if a < b}
    for p in paired:
        fa, fb = (study.user_attrs[f"final/{n}"]["fid_final"] for n in (p["a"], p["b"]))
        assert p["diff"] == pytest.approx(fa - fb) and p["num_samples"] == 48 and len(p["ci"]) == 2
    for n in finals:
        low, high = study.user_attrs[f"final/{n}"]["fid_final_ci"]
        assert low <= study.user_attrs[f"final/{n}"]["fid_final"] <= high
    # Every finalist cheaper than the best CFG point (unguided, SG) is decided against it by its paired interval.
    cheaper = [
        n for n in finals if trials[n].user_attrs["family"] != "cfg" and trials[n].values[1] < best_cfg.values[1]
    ]
    decided = (summary["report_dir"] / "summary.json").read_text()
    assert ("paired interval" in decided) == bool(cheaper)

    # MLflow: the parent run, one child per trial tagged with it, the report among the parent's artifacts.
    client = MlflowClient(trained[2])
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.info.run_name.startswith("sweep sparsity_pareto @ ") and parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    child = client.get_run(trials[5].user_attrs["mlflow_run_id"])
    assert child.data.params["scale"] == "5.0"
    # sgexp.evaluate's keys with the family as the setting, at the checkpoint's step; no bare "fid".
    assert child.data.metrics["eval/sg/fid"] == pytest.approx(trials[5].values[0])
    assert all(k.startswith("eval/sg/") for k in child.data.metrics)
    cfg_child = client.get_run(trials[1].user_attrs["mlflow_run_id"])
    assert cfg_child.data.metrics["eval/cfg/gflops_per_sample"] == pytest.approx(trials[1].values[1])
    # The finalists' intervals on their own runs, the paired differences on the parent.
    for n in finals:
        family, final = trials[n].user_attrs["family"], study.user_attrs[f"final/{n}"]
        logged = client.get_run(trials[n].user_attrs["mlflow_run_id"]).data.metrics
        ci = [logged[f"eval/{family}/fid_final_ci_low"], logged[f"eval/{family}/fid_final_ci_high"]]
        assert ci == pytest.approx(final["fid_final_ci"])
    for p in paired:
        key = f"eval/paired/trial-{p['a']}-trial-{p['b']}/{p['metric']}_diff"
        assert parent.data.metrics[key] == pytest.approx(p["diff"])
    step = torch.load(trained[1].checkpoint, map_location="cpu", weights_only=False)["global_step"]
    assert {m.step for m in client.get_metric_history(child.info.run_id, "eval/sg/fid")} == {step}
    finalist = client.get_run(trials[front[0].number].user_attrs["mlflow_run_id"])
    family = front[0].user_attrs["family"]
    assert finalist.data.metrics[f"eval/{family}/fid_final"] == pytest.approx(front[0].user_attrs["fid_final"])
    images = [Path(f.path).name for f in client.list_artifacts(child.info.run_id, "images")]
    assert any(name.startswith(f"eval~sg~samples+step+{step}+") for name in images), images
    assert REPORT_FILES <= {Path(f.path).name for f in client.list_artifacts(parent.info.run_id, "report")}
    out = capsys.readouterr().out
    assert "Pareto set of sparsity_pareto" in out and "report:" in out and parent.info.run_id in out

    # Re-running the finished study redoes nothing and enqueues no baseline again.
    cli.main(cli_args(trained, tmp_path))
    assert len(load(tmp_path).trials) == 9
    with pytest.raises(ValueError, match=r"resuming with changed \['samples_per_trial'\]"):
        cli.main(cli_args(trained, tmp_path, "--samples", "30"))  # would mix incomparable FIDs

    # --report works from the storage alone.
    summary = cli.main(["--study", "sparsity_pareto", "--storage", str(tmp_path / "study.log"), "--report"])
    assert {t.number for t in pareto_trials(summary["view"])} == {t.number for t in front}


def test_resume_after_the_driver_is_killed_mid_trial(trained, tmp_path):
    args = cli_args(trained, tmp_path, "--final-samples", "0", n_trials=8, steps=12)
    command = [sys.executable, "-m", "sgexp.sweeps", *args]
    err_file = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: nobody reads it while we poll
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file, env=env)
    killed, deadline, journal = None, time.monotonic() + 120, tmp_path / "study.log"
    try:
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            if not journal.is_file() or not optuna.get_all_study_names(open_storage(str(journal))):
                continue
            # Sampling (its MLflow run is open) and not appending to the journal: a lock file left by a killed
            # writer would make the resume wait the lock's 30 s grace period.
            trials = load(tmp_path).trials
            sampling = [t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            if sampling and sampling[0].number >= 1 and not Path(f"{journal}.lock").exists():
                os.kill(proc.pid, signal.SIGKILL)
                killed = sampling[0].number
    finally:
        proc.kill()
        proc.wait()
        err_file.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert killed is not None, f"no running trial seen before the driver ended: {stderr[-3000:]}"
    left = [t.number for t in load(tmp_path).trials if t.state == TrialState.RUNNING]
    assert len(left) == 1  # left behind by the dead driver (usually ``killed``, unless it ended meanwhile)
    killed = left[0]

    cli.main(command[3:])  # the same command, resumed (in this process: one interpreter start less)
    trials = load(tmp_path).trials
    dead = trials[killed]
    assert dead.state == TrialState.FAIL and dead.user_attrs["fail_reason"] == STALE and dead.user_attrs["requeued"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == dead.params and key(retries[0]) == key(dead)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 8 and len(trials) == 9  # the budget, plus the one requeued FAIL
    assert len({key(t) for t in complete}) == 8  # nothing evaluated twice


def test_two_workers_share_one_journal(trained, tmp_path):
    args = cli_args(trained, tmp_path, "--workers", "2", "--final-samples", "0", n_trials=10, steps=15)
    cli.main(args)  # spawns two worker processes
    trials = load(tmp_path).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert 10 <= len(finished) <= 11 and all(t.state == TrialState.COMPLETE for t in finished)  # overshoot <= K-1
    assert len({t.number for t in finished}) == len(finished) and len({key(t) for t in finished}) == len(finished)
    workers = {t.user_attrs["worker"] for t in finished}
    assert len(workers) == 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    logs = sorted((tmp_path / "runs" / "sweeps" / "sparsity_pareto" / "workers").glob("*.log"))
    assert [p.name for p in logs] == ["0.log", "1.log"]


def test_failing_trials_are_recorded_and_the_study_goes_on(trained, tmp_path, monkeypatch):
    real, calls = evaluator.score_setting, []

    def flaky(setting, *args, **kwargs):
        calls.append(setting.name)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        row, grid = real(setting, *args, **kwargs)
        if len(calls) == 4:
            row["fid"] = float("nan")
        return row, grid

    monkeypatch.setattr(evaluator, "score_setting", flaky)  # fault injection around the real scoring
    baselines = "[{rule: none}, {rule: none}, {rule: cfg, scale: 1.5}, {rule: sg, scale: 3, gamma_weak: '0.9'}]"
    storage = f"sqlite:///{tmp_path / 'study.db'}"  # an RDB storage this time
    args = ["--set", f"baselines={baselines}", "--final-samples", "0", "--storage", storage]
    cli.main(cli_args(trained, tmp_path, *args, n_trials=6))
    trials = optuna.load_study(study_name="sparsity_pareto", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    assert trials[0].values == trials[1].values  # the same setting on the same samples: the same FID
    assert trials[2].user_attrs["fail_reason"] == "RuntimeError: injected failure"
    assert trials[3].user_attrs["fail_reason"].startswith("FloatingPointError: non-finite FID")
    client = MlflowClient(trained[2])
    assert client.get_run(trials[2].user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(trials[4].user_attrs["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["space.sg.gamma_strong.high=1.0"], r"space.sg.gamma_strong=.* is invalid: sparsity"),
        (["space.sg.scale.low=0.5"], r"space.sg.scale=.* is invalid: guidance scale must be >= 1"),
        (["space.sg.scale.low=3", "space.sg.scale.high=2"], r"needs low < high"),
        (["space.sg.gamma_weak_max=0.5"], r"gamma_weak_max=0.5 is invalid"),
        (["space.sg.gamma_weak_fraction=null", "space.sg.gamma_weak={low: 0.1, high: 0.9}"], r"γ_s < γ_w"),
        (["baselines=[{rule: sg, scale: 2, gamma_strong: '0.9', gamma_weak: '0.5'}]"], r"gamma_strong=0.9"),
        (["objectives=[fid, precision]"], r"objectives=.* is invalid"),
        (["final_samples=10", "samples_per_trial=24"], r"final_samples=10 is invalid"),
        (["optuna.max_retries=-1"], r"optuna.max_retries=-1 is invalid: must be an integer >= 0"),
    ],
)
def test_invalid_study_fails_on_load(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_study("sparsity_pareto", overrides)


def test_bad_input_fails_before_any_trial(trained, tmp_path):
    with pytest.raises(ValueError, match=r"study='nope' is invalid: .*'cfg_scale', .*'sg_vs_cfg', 'sparsity_pareto'\]"):
        cli.main(["--study", "nope"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="storage=.* is invalid: cannot open the journal file"):
        cli.main(cli_args(trained, tmp_path, "--storage", str(tmp_path / "a_file" / "study.log")))
    with pytest.raises(ValueError, match="storage='nosuchdb://x' is invalid: cannot open this database URL"):
        cli.main(cli_args(trained, tmp_path, "--storage", "nosuchdb://x"))
    with pytest.raises(FileNotFoundError, match="checkpoint='/no/such.ckpt' is invalid"):
        cli.main(cli_args(trained, tmp_path, "--set", "checkpoint=/no/such.ckpt"))
    assert optuna.get_all_study_names(open_storage(str(tmp_path / "study.log"))) == []
    with pytest.raises(ValueError, match="workers=0 is invalid"):
        cli.main(cli_args(trained, tmp_path, "--workers", "0"))
    with pytest.raises(ValueError, match="--slurm-array=0 is invalid: the number of worker jobs"):
        cli.main(cli_args(trained, tmp_path, "--slurm-array", "0"))
    with pytest.raises(ValueError, match="--workers=2 is invalid with --slurm-array"):
        cli.main(cli_args(trained, tmp_path, "--slurm-array", "2", "--workers", "2"))
    with pytest.raises(ValueError, match="is not in .* which holds \\[\\]"):
        cli.main(["--study", "sparsity_pareto", "--storage", str(tmp_path / "study.log"), "--report"])


def test_space_parametrisation_and_sampler_view():
    cfg = load_study("sparsity_pareto")
    space = SearchSpace(cfg)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(cfg))
    assert isinstance(study.sampler, InSpaceSampler)
    study.enqueue_trial({}, user_attrs={"setting": {"rule": "cfg", "scale": 1.5}, "in_space": False})
    family, params = space.params_for({"rule": "sg", "scale": 5.0, "gamma_strong": "0.5", "gamma_weak": "0.9"})
    assert family == "sg" and params["gamma_weak_fraction"] == pytest.approx(0.4 / 0.45)
    assert space.params_for({"rule": "sg", "scale": 9.0, "gamma_strong": 0.5, "gamma_weak": 0.9}) is None  # w > 8
    assert space.params_for({"rule": "cfg", "scale": 1.5}) is None
    study.tell(study.ask(), [100.0, 20.0])  # the fixed CFG point, outside the space
    for _ in range(30):
        trial = study.ask()
        _, setting = space.suggest(trial)
        assert 0 <= setting["gamma_strong"] < setting["gamma_weak"] <= 0.95 and 1 <= setting["scale"] <= 8
        study.tell(trial, [setting["gamma_weak"] - setting["gamma_strong"], setting["scale"]])
    assert len(study.sampler._view(study, None).trials) == 30 and len(study.trials) == 31  # the CFG point hidden

    both = SearchSpace(load_study("sg_vs_cfg"))
    mixed = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    families = set()
    for _ in range(20):
        trial = mixed.ask()
        family, setting = both.suggest(trial)
        families.add(family)
        expected = {"family", *(f"{family}/{k}" for k in both.families[family].ranges)}
        assert setting["rule"] == family and set(trial.params) == expected
        mixed.tell(trial, [1.0, 1.0])
    assert families == {"cfg", "sg"}
    assert load_study("cfg_scale").space.cfg.scale.high == 4.0


@pytest.mark.parametrize("sampler", ["tpe", "gp", "nsga2"])
def test_samplers_do_not_see_fixed_points_of_other_families(sampler):
    """A fixed CFG point has no parameters: shown to GP or multivariate TPE, the intersection search
    space would be empty and they would sample at random."""
    overrides = [f"optuna.sampler={sampler}", "optuna.n_startup_trials=3", "optuna.population_size=4"]
    cfg = load_study("sparsity_pareto", overrides)
    space = SearchSpace(cfg)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(cfg))
    study.enqueue_trial({}, user_attrs={"in_space": False})
    study.tell(study.ask(), [100.0, 20.0])
    for _ in range(7):
        trial = study.ask()
        _, s = space.suggest(trial)
        assert 0 <= s["gamma_strong"] < s["gamma_weak"] <= 0.95 and 1 <= s["scale"] <= 8
        study.tell(trial, [(s["gamma_weak"] - 0.8) ** 2 + 1 / s["scale"], 2 - s["gamma_strong"] - s["gamma_weak"]])
    last = study.trials[-1]
    if sampler != "nsga2":  # NSGA-II has no relative search space; it only needs to run
        searched = {"scale", "gamma_strong", "gamma_weak_fraction"}
        assert set(study.sampler.infer_relative_search_space(study, last)) == searched
        # what the raw sampler would have seen:
        assert intersection_search_space(study.trials) == {}


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_stale_trial_is_released_once_and_heartbeats_keep_trials_alive(tmp_path, kind):
    url = str(tmp_path / "s.log") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    studies = [optuna.create_study(storage=open_storage(url), study_name="s", directions=["minimize"] * 2)]
    studies.append(optuna.load_study(study_name="s", storage=open_storage(url)))  # as another process sees it
    a, b = studies
    trial = a.ask()
    trial.suggest_float("x", 0.0, 1.0)
    # Generous margins: this machine's timing drifts under load (a beat every 0.2 s, stale after 3 s).
    with Heartbeat(a._storage, trial._trial_id, interval=0.2):
        time.sleep(1.0)
        assert time.time() - last_beat(b.trials[0]) < 3.0 and reap_stale(b, timeout=3.0) == []
    seen_by_a = a.trials[0]  # both workers see it RUNNING and stale...
    time.sleep(3.5)
    assert [(t.number, reason) for t, reason in reap_stale(b, timeout=3.0)] == [(0, STALE)]
    assert release(a, seen_by_a, STALE, max_retries=1) is None  # ...but only the first FAIL counts: one retry
    trials = a.trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[0].user_attrs["fail_reason"] == STALE and trials[1].user_attrs["retry_of"] == 0
    assert trials[1].user_attrs["retries"] == 1
    assert counts(a)["done"] == 0  # a requeued FAIL does not use the budget
    retry = a.ask()
    assert retry.number == 1 and retry.suggest_float("x", 0.0, 1.0) == trials[0].params["x"]


def test_fig6_ag_sg_grid_study_runs_the_whole_grid_and_logs_its_heatmap(trained, tmp_path):
    """A 1 w × 2 × 2 AG+SG grid (γ_s >= γ_w cells included) plus an ICG fixed point: the grid sampler visits
    every cell once, the report draws the exact map and logs it to the study's MLflow parent run."""
    shards, result, tracking_uri = trained
    sets = [
        f"checkpoint={result.checkpoint}",
        f"weak_checkpoint={result.checkpoint}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        "sampler.steps=2",
        "batch_size=48",
        "grid_size=0",
        "space.ag_sg.scale=null",
        "+space.ag_sg.fixed.scale=2.0",
        "baselines=[{rule: icg, scale: 2.0}]",
        *[f"space.ag_sg.{key}={{low: 0.0, high: 0.8, step: 0.8}}" for key in ("gamma_strong", "gamma_weak")],
    ]
    args = ["--study", "fig6_ag_sg", "--storage", str(tmp_path / "study.log"), "--tracking-uri", tracking_uri]
    args += ["--n-trials", "5", "--samples", "16", *[a for s in sets for a in ("--set", s)]]
    summary = cli.main(args)
    trials = load(tmp_path, "fig6_ag_sg").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    icg = trials[0]  # the baseline, sampled end to end with a random class per sample on its weak branch
    assert icg.user_attrs["family"] == "icg" and not icg.params and math.isfinite(icg.values[0])
    assert icg.user_attrs["relative_to_cfg"] == 1.0  # priced like CFG: two dense passes
    grid = [t for t in trials if t.user_attrs["family"] == "ag_sg"]
    cells = sorted((t.params["gamma_strong"], t.params["gamma_weak"]) for t in grid)
    assert cells == [(0.0, 0.0), (0.0, 0.8), (0.8, 0.0), (0.8, 0.8)]  # each once, γ_s >= γ_w included
    assert all(t.user_attrs["setting"]["rule"] == "ag_sg" and t.user_attrs["scale"] == 2.0 for t in grid)
    assert {t.system_attrs["grid_id"] for t in grid} == {0, 1, 2, 3}
    assert summary["report"]["heatmaps_ag_sg.png"].stat().st_size > 0
    client = MlflowClient(tracking_uri)
    parent = load(tmp_path, "fig6_ag_sg").user_attrs["mlflow_parent_run_id"]
    assert "heatmaps_ag_sg.png" in {Path(f.path).name for f in client.list_artifacts(parent, "report")}
    cli.main(args)  # the grid is done: a re-run evaluates nothing again
    assert len(load(tmp_path, "fig6_ag_sg").trials) == 5


def test_fig6_grid_is_the_papers_and_grids_are_checked():
    cfg = load_study("fig6_ag_sg", ["weak_checkpoint=any.ckpt"])
    space = SearchSpace(cfg)
    gammas = [0.0, 0.2, 0.4, 0.6, 0.8]  # the full [0, 0.8]², γ_s >= γ_w included
    grid = {"scale": [1.3, 1.5, 1.7, 1.9], "gamma_strong": gammas, "gamma_weak": gammas}
    assert space.families["ag_sg"].grid() == grid
    assert cfg.n_trials == 4 * 5 * 5 + len(cfg.baselines)
    with pytest.raises(ValueError, match=r"weak_checkpoint=None is invalid: family 'ag_sg' \(AutoGuidance\)"):
        load_study("fig6_ag_sg")
    with pytest.raises(ValueError, match=r"n_trials=103 is invalid: exceeds the grid's 100 points \+ 2 baselines"):
        load_study("fig6_ag_sg", ["weak_checkpoint=any.ckpt", "n_trials=103"])
    with pytest.raises(ValueError, match=r"space.ag_sg.scale.step=None is invalid: the grid sampler needs a step"):
        load_study("fig6_ag_sg", ["weak_checkpoint=any.ckpt", "space.ag_sg.scale.step=null"])
    with pytest.raises(ValueError, match=r"optuna.sampler='grid' is invalid: searches one family"):
        load_study("cfg_icg_scale", ["optuna.sampler=grid"])
    # ICG is a family of its own (dense: no γ to search); a study stored before ranges had a step still resumes.
    assert SearchSpace(load_study("cfg_icg_scale")).params_for({"rule": "icg", "scale": 1.5})[0] == "icg"
    old = OmegaConf.to_container(load_study("sparsity_pareto"), resolve=True)
    for ranges in old["space"].values():
        for r in ranges.values():
            if isinstance(r, dict) and "low" in r:
                del r["step"]
    assert frozen_config(old) == frozen_config(load_study("sparsity_pareto"))
