"""Progress where nobody watches a terminal: a training into a log file and a sweep's view, batch by batch.

A training whose stdout is a file gets a line per ``callbacks.monitor_every_n_steps`` with its ETA
instead of a Rich bar; a sweep's driver reports each sampling batch of a trial (samples/s, the trial's
ETA and the study's) as log lines off a terminal and in its live view on one."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT, digits_run
from rich.console import Console
from test_sweep import cli_args, load, one_torch_thread, trained  # noqa: F401 (fixtures)
from test_train import Terminal

from sgexp.sweeps import cli
from sgexp.sweeps.progress import LiveProgress, Outlook
from sgexp.train import show_progress_bar

STEP_LINE = re.compile(r"^step (\d+)/8: loss [\d.]+, \d+ images/s, ETA (\d+:\d\d:\d\d|\?)$")
PASS_LINE = r"(\d+)/{total} samples \(\d+%\), [\d.]+ samples/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d"


def test_training_into_a_log_file_writes_a_line_per_period_with_eta(tmp_path, shards):
    """``python -m sgexp.train > log`` with the default ``trainer.progress=rich``: no bar, periodic lines."""
    quick = ("callbacks.guided_eval.train_classifier=false", "logger.enabled=false")  # startup in seconds
    overrides = digits_run(tmp_path, shards, "trainer.progress=rich", *quick)
    log, err = tmp_path / "train.log", tmp_path / "train.err"
    with log.open("w") as out, err.open("w") as errors:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "sgexp.train", *overrides], cwd=ROOT, stdout=out, stderr=errors, env=env
        )
    assert done.returncode == 0, err.read_text()[-3000:]
    lines = log.read_text().splitlines()
    steps = [m for line in lines if (m := STEP_LINE.match(line))]
    assert [int(m.group(1)) for m in steps] == [2, 4, 6, 8], lines  # callbacks.monitor_every_n_steps=2
    assert all(m.group(2) != "?" for m in steps[:-1])  # steps are left until the last line
    assert steps[-1].group(2) == "0:00:00"
    # The evaluation at the end: each setting's sampling pass as lines with samples/s and ETA.
    for setting in ("none", "cfg", "sg"):
        assert any(re.search(rf"^ +{setting}: {PASS_LINE.format(total=20)}$", line) for line in lines), setting
    assert not any("━" in line for line in lines)  # no Rich bar in the file
    assert any(line.startswith("  checkpoint   /") for line in lines)  # paths not wrapped at 80 columns


def test_sweep_reports_each_sampling_batch_with_the_trial_and_study_eta(trained, tmp_path, capsys):  # noqa: F811
    """A real 4-trial study, 2 batches per trial and 4 per finalist, its stderr not a terminal."""
    args = cli_args(trained, tmp_path, "--set", "batch_size=8", n_trials=4, samples=16, steps=2)
    cli.main(args)
    err = capsys.readouterr().err
    trials = re.findall(rf"trial (\d+) [^:]*: {PASS_LINE.format(total=16)}, study ETA (\S+) \(([^)]*)\)", err)
    # Two lines per trial (8 and 16 of 16 samples), each with a finite ETA of the trial and of the study.
    assert [(int(n), int(done)) for n, done, _, _ in trials] == [(n, d) for n in range(4) for d in (8, 16)], err
    assert all(eta != "?" for _, _, eta, _ in trials)
    left = [what for _, _, _, what in trials]
    assert left[0].startswith("3 more trials") and left[4].startswith("1 more trial")
    assert "more trial" not in left[-1]  # the last trial: only the finalists' re-scoring is left
    finals = re.findall(rf"final (\d+)/(\d+): trial \d+: {PASS_LINE.format(total=32)}, study ETA \S+ \(([^)]*)\)", err)
    m = int(finals[0][1])
    assert m >= 1 and len(finals) == 4 * m  # one line per batch of 8 of each finalist's 32 samples
    assert finals[-1][0] == str(m) and finals[-1][3] == "last pass"
    if m > 1:
        assert finals[0][3] == f"{m - 1} finalist{'s' * (m > 2)} to re-score"

    # On a terminal the same pass is a line of the live view, under the tables.
    study, screen = load(tmp_path), io.StringIO()
    with LiveProgress(Console(file=screen, force_terminal=True, width=200)) as progress:
        progress(study)
        with progress.track(study, "trial 99 sg", 10) as advance:
            advance(5)
            progress.live.refresh()
    text = screen.getvalue()
    assert "sparsity_pareto: 4/4 trials finished" in text and "Pareto set (screening)" in text
    assert re.search(r"trial 99 sg .*5/10 samples +[\d.]+ samples/s +ETA \d+:\d\d:\d\d, study ETA", text)
    # The finished study: nothing left, and a trial takes what its finished trials took on average.
    outlook = Outlook.of(study, 16)
    assert (outlook.trials, outlook.finals) == (0, 0) and 0 < outlook.trial_seconds < 600


def test_the_study_eta_counts_trials_and_finalists_left():
    later = Outlook(trials=2, trial_seconds=10.0, finals=3, final_samples=100)
    assert later.seconds(samples=50, rate=25.0) == pytest.approx(2 * 10 + 3 * 100 / 25)
    first = Outlook(trials=2, trial_seconds=math.nan, finals=0, final_samples=0)  # no trial finished yet
    assert first.seconds(samples=50, rate=25.0) == pytest.approx(2 * 50 / 25)
    assert math.isnan(later.seconds(samples=50, rate=0.0))  # nothing done yet: no rate, no ETA
    assert later.describe() == "2 more trials, 3 finalists to re-score"
    assert Outlook(0, math.nan, 0, 0).describe() == "last pass"


def test_trainer_progress_draws_a_bar_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not show_progress_bar("rich") and not show_progress_bar("none")
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert show_progress_bar("rich") and not show_progress_bar("none")
    with pytest.raises(ValueError, match="trainer.progress='bar' is invalid"):
        show_progress_bar("bar")


def test_a_one_batch_pass_shows_its_rate_on_a_terminal(monkeypatch):
    """Rich's own speed estimate needs two updates; a pass of one batch (an in-training evaluation) has one."""
    import rich

    from sgexp.progress import track

    screen = Terminal()
    monkeypatch.setattr(rich, "_console", Console(file=screen, force_terminal=True, color_system=None, width=200))
    with track("sg", total=20, terminal=True) as advance:
        advance(20)
    assert re.search(r"sg .*20/20 [\d.]+ samples/s", screen.getvalue())


def test_preparing_a_dataset_off_a_terminal_logs_each_split_with_its_eta(tmp_path, caplog):
    from sgexp.data.prepare import prepare_digits

    with caplog.at_level(logging.INFO, logger="sgexp.progress"):
        prepare_digits(tmp_path, val_size=180)
    for split, total in (("train", 1617), ("val", 180)):
        lines = re.findall(
            rf"digits {split}: " + PASS_LINE.format(total=total).replace("samples", "images"), caplog.text
        )
        assert lines and int(lines[-1]) == total, caplog.text
