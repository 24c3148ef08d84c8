"""Restart safety of ``python -m sgexp.sweeps``: a setting that kills its worker is retried at most
``optuna.max_retries`` times, a journal cut by a crash stays usable, and concurrent commands on one study
propose distinct points. Real processes, real SIGKILLs, real Optuna journal files; no mocks."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import test_sweep
from conftest import ROOT
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from test_sweep import cli_args, key, load

from sgexp.sweeps import cli
from sgexp.sweeps.storage import INTERRUPTED, STALE, counts, is_counted_fail, open_storage, reap_stale, release
from sgexp.sweeps.study import load_study

# The fixtures of tests/test_sweep.py: its tiny digits checkpoint (trained once for this module), one thread.
trained, one_torch_thread = test_sweep.trained, test_sweep.one_torch_thread
KILLED = {"rule": "cfg", "scale": 2.0}  # the third baseline of sparsity_pareto


def journal_study(path: Path) -> optuna.Study:
    return optuna.create_study(
        storage=open_storage(str(path)), study_name="s", directions=["minimize"] * 2, load_if_exists=True
    )


def enqueued_x(study: optuna.Study) -> list[float]:
    return [t.system_attrs["fixed_params"]["x"] for t in study.trials]


def run_trial_and_die(study: optuna.Study) -> None:
    """Ask the next trial (a retry if one is enqueued) and leave it RUNNING, as a killed worker does."""
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    time.sleep(0.01)  # its start is now in the past: stale for timeout 0


# --------------------------------------------------------------------------- the retry limit


def test_retry_chain_counts_and_stops_at_max_retries(tmp_path):
    study = journal_study(tmp_path / "s.log")
    study.enqueue_trial({"x": 0.25}, user_attrs={"setting": {"rule": "none"}})
    run_trial_and_die(study)
    for retries in (1, 2):  # each death enqueues a retry carrying the chain's count
        [(dead, reason)] = reap_stale(study, timeout=0.0, max_retries=2)
        assert reason == STALE
        retry = study.get_trials(states=(TrialState.WAITING,))[0]
        assert retry.user_attrs["retries"] == retries and retry.user_attrs["retry_of"] == dead.number
        assert retry.user_attrs["setting"] == {"rule": "none"}
        run_trial_and_die(study)
    [(_, reason)] = reap_stale(study, timeout=0.0, max_retries=2)
    assert reason == "worker died (stale heartbeat) 3 times; max_retries=2"
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3 and [t.params["x"] for t in trials] == [0.25] * 3
    assert [t.user_attrs.get("requeued", False) for t in trials] == [True, True, False]
    assert [t.user_attrs["retries"] for t in trials] == [0, 1, 2] and trials[2].user_attrs["fail_reason"] == reason
    assert counts(study)["done"] == 1 and is_counted_fail(trials[2])  # the budget counts it once

    # A worker that is stopped (Ctrl-C) hands its trial back without using a retry; max_retries=0: no retry.
    study.enqueue_trial({"x": 0.5}, user_attrs={"retries": 1})
    run_trial_and_die(study)
    assert release(study, study.trials[-1], INTERRUPTED) == INTERRUPTED
    assert study.get_trials(states=(TrialState.WAITING,))[0].user_attrs["retries"] == 1
    run_trial_and_die(study)
    [(_, reason)] = reap_stale(study, timeout=0.0, max_retries=0)
    assert reason == "worker died (stale heartbeat) 2 times; max_retries=0" and counts(study)["waiting"] == 0


def test_max_retries_is_typed_and_defaults_to_one():
    """(Negative values: ``test_sweep.test_invalid_study_fails_on_load``.)"""
    with pytest.raises(ConfigCompositionException, match=r"optuna.max_retries=1.5"):  # the typed schema
        load_study("sparsity_pareto", ["optuna.max_retries=1.5"])
    assert load_study("sparsity_pareto").optuna.max_retries == 1


def test_a_setting_that_kills_its_worker_fails_after_max_retries(trained, tmp_path, monkeypatch):
    """Three workers; the CFG w=2 baseline SIGKILLs whichever worker runs it (an OOM kill): it kills two
    (the trial and its one retry), is then a counted FAIL, and the third worker finishes the study."""
    monkeypatch.setenv("SGEXP_TEST_KILL_SETTING", json.dumps(KILLED))  # inherited by the spawned workers
    extra = ["--workers", "3", "--final-samples", "0", "--set", "heartbeat.timeout=4", "--set", "optuna.max_retries=1"]
    started = time.monotonic()
    cli.main(cli_args(trained, tmp_path, *extra, n_trials=8))
    trials = load(tmp_path).trials
    killed = [t for t in trials if {k: t.user_attrs["setting"].get(k) for k in KILLED} == KILLED]
    first, retry = killed
    assert first.state == retry.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == STALE and first.user_attrs["requeued"]
    assert first.user_attrs["retries"] == 0 and first.user_attrs["baseline"]
    assert retry.user_attrs["retry_of"] == first.number and retry.user_attrs["retries"] == 1
    assert retry.user_attrs["fail_reason"] == "worker died (stale heartbeat) 2 times; max_retries=1"
    assert is_counted_fail(retry) and first.user_attrs["worker"] != retry.user_attrs["worker"]  # two workers died
    others = [t for t in trials if t not in killed]
    assert all(t.state == TrialState.COMPLETE or t.user_attrs.get("requeued") for t in others)
    assert 7 <= sum(t.state == TrialState.COMPLETE for t in trials) <= 8  # the budget: 8 with the counted FAIL
    assert len({t.user_attrs["worker"] for t in trials}) == 3

    client = MlflowClient(trained[2])
    first_run, retry_run = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in killed)
    assert first_run.data.tags["sgexp.retries"] == "0" and retry_run.data.tags["sgexp.retries"] == "1"
    assert first_run.info.status == retry_run.info.status == "FAILED"
    assert retry_run.data.tags["fail_reason"] == retry.user_attrs["fail_reason"]
    logs = (tmp_path / "runs" / "sweeps" / "sparsity_pareto" / "workers").glob("*.log")
    assert sum("max_retries=1" in p.read_text() for p in logs) == 1  # the survivor that recorded it
    print(f"kill test: {time.monotonic() - started:.0f} s")


# --------------------------------------------------------------------------- the journal


def test_cut_last_line_is_set_aside_and_a_bad_middle_line_is_named(tmp_path, caplog):
    path = tmp_path / "s.log"
    study = journal_study(path)
    for x in (0.1, 0.2):
        study.enqueue_trial({"x": x})
    live = optuna.load_study(study_name="s", storage=open_storage(str(path)))  # a worker that stays alive
    record = path.read_bytes().splitlines(keepends=True)[-1]
    cut = record[: len(record) // 2]
    with path.open("ab") as f:  # a writer killed mid-line
        f.write(cut)

    with caplog.at_level(logging.WARNING, logger="sgexp.sweeps.journal"):
        reopened = journal_study(path)  # the next command
    assert f"{path}.corrupt" in caplog.text and str(path) in caplog.text
    assert Path(f"{path}.corrupt").read_bytes() == cut + b"\n"
    assert all(json.loads(line) for line in path.read_bytes().splitlines(keepends=True))  # complete lines only
    reopened.enqueue_trial({"x": 0.3})
    assert enqueued_x(journal_study(path)) == [0.1, 0.2, 0.3]

    with path.open("ab") as f:  # cut again, while ``live`` keeps running: its next append sets it aside
        f.write(cut)
    live.enqueue_trial({"x": 0.4})
    assert enqueued_x(journal_study(path)) == [0.1, 0.2, 0.3, 0.4]
    assert Path(f"{path}.corrupt").read_bytes() == (cut + b"\n") * 2

    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:3], b'{"op_code": 5, "worker\n', *lines[3:]]))  # garbage on line 4
    with pytest.raises(ValueError, match=rf"storage='{path}' is invalid: line 4 of this Optuna journal"):
        open_storage(str(path))


def test_a_study_whose_journal_was_cut_resumes_and_reports(trained, tmp_path):
    args = cli_args(trained, tmp_path, "--final-samples", "0", n_trials=6)
    cli.main(args)
    journal = tmp_path / "study.log"
    cut = journal.read_bytes().splitlines(keepends=True)[-1][:25]
    with journal.open("ab") as f:
        f.write(cut)
    cli.main([*args, "--n-trials", "7"])  # the next command resumes (and appends)
    assert Path(f"{journal}.corrupt").read_bytes() == cut + b"\n"
    assert [t.state for t in load(tmp_path).trials] == [TrialState.COMPLETE] * 7
    report = ["--study", "sparsity_pareto", "--storage", str(journal), "--report"]
    assert cli.main(report)["counts"]["complete"] == 7

    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join([*lines[:9], b"\x00\x00\x00\n", *lines[9:]]))
    with pytest.raises(ValueError, match=rf"storage='{journal}' is invalid: line 10 of this Optuna journal"):
        cli.main(report)


# --------------------------------------------------------------------------- concurrent commands


@pytest.mark.slow  # ~30 s: two sweep processes side by side
def test_two_commands_on_one_study_propose_distinct_points(trained, tmp_path):
    """Two shells running the same command on one journal at once: before process seeds, both were
    "worker 0" with seed 0 and proposed the same random startup points."""
    args = cli_args(trained, tmp_path, "--final-samples", "0", "--set", "optuna.n_startup_trials=50", n_trials=6)
    cli.main(args)  # the study and its 6 baselines, so that both commands start sampling at once
    command = [sys.executable, "-m", "sgexp.sweeps", *args, "--n-trials", "30"]  # enough for both to sample
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [(tmp_path / f"command{i}.txt").open("w") for i in range(2)]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env) for f in logs]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        for f in logs:
            f.close()
    outputs = [(tmp_path / f"command{i}.txt").read_text()[-3000:] for i in range(2)]
    assert codes == [0, 0], outputs
    trials = [t for t in load(tmp_path).trials if t.state == TrialState.COMPLETE]
    sampled = [t for t in trials if not t.user_attrs["baseline"]]
    assert len(trials) >= 30 and len(sampled) >= 24
    assert len({key(t) for t in trials}) == len(trials), "a point was proposed twice"
    by_worker = {}
    for t in sampled:
        by_worker.setdefault(t.user_attrs["worker"], set()).add(t.user_attrs["sampler_seed"])
    assert len(by_worker) == 2, f"one command ran every sampled trial: {by_worker}"
    assert all(len(seeds) == 1 for seeds in by_worker.values())  # one seed per process...
    assert len(set().union(*by_worker.values())) == 2  # ...and distinct


@pytest.mark.slow  # ~30 s: two sweep processes side by side
def test_two_commands_starting_a_new_study_together_set_it_up_once(trained, tmp_path):
    """Both commands reach study setup at the same moment: the setup lock lets one create the study, its
    MLflow parent run and the baselines; the other resumes it (no baseline twice)."""
    args = cli_args(trained, tmp_path, "--final-samples", "0", n_trials=6)  # the 6 baselines only
    command = [sys.executable, "-m", "sgexp.sweeps", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)]
    procs.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env))
    outputs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = load(tmp_path)
    baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
    assert len(baselines) == 6 and len({key(t) for t in baselines}) == 6, "baselines were enqueued twice"
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
