"""What the driving process shows: a live table of recent trials and the current Pareto set, then the
final Pareto table; while ``--slurm-array K --wait`` waits, one line per change of the array's tasks
(queued, running, finished) or of the study's trials, and at least one per ``period`` (a log file is not
silent for hours while jobs queue). Worker processes only write log lines."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from sgexp import tracking
from sgexp.diffusion.guidance import RULES
from sgexp.sweeps.report import pareto_trials
from sgexp.sweeps.storage import counts, is_counted_fail


def label(attrs: dict[str, Any]) -> str:
    """``sg w=5 γs=0.5 γw=0.9`` from a trial's attributes (or a row of ``report.pareto_table``)."""
    family, setting = attrs.get("family", "?"), attrs.get("setting") or {}
    parts = [str(family)]
    rule = RULES.get(setting.get("rule", family))
    if rule is None or rule.weak is not None:  # an unguided rule has no scale
        parts.append(f"w={attrs.get('scale', 1.0):.3g}")
    for key, short in (("gamma_strong", "γs"), ("gamma_weak", "γw")):
        value = setting.get(key, 0.0)
        if value not in (0, 0.0, "0"):
            parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def _num(value: Any, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, int | float) and math.isfinite(value) else "-"


def trials_table(trials: list[FrozenTrial], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("#", "family", "w", "γ_s", "γ_w", "FID", "GFLOPs", "state"):
        table.add_column(column, justify="left" if column in ("family", "state") else "right")
    for t in trials:
        a, values = t.user_attrs, t.values or [None, None]
        state = t.state.name + (" (requeued)" if t.state == TrialState.FAIL and a.get("requeued") else "")
        gammas = [_num(a.get(k), "{:.3g}") for k in ("scale", "gamma_strong", "gamma_weak")]
        fid, gflops = _num(values[0], "{:.2f}"), _num(values[1], "{:.4g}")
        table.add_row(str(t.number), str(a.get("family", "")), *gammas, fid, gflops, state)
    return table


def render(study: optuna.Study, recent: int = 8) -> Group:
    trials = study.get_trials(deepcopy=False)
    started = [t for t in trials if t.state != TrialState.WAITING]
    done = sum(t.state == TrialState.COMPLETE or is_counted_fail(t) for t in trials)
    budget = study.user_attrs.get("config", {}).get("n_trials", "?")
    title = f"{study.study_name}: {done}/{budget} trials finished, last {min(recent, len(started))}"
    return Group(trials_table(started[-recent:], title), trials_table(pareto_trials(study), "Pareto set (screening)"))


class LiveProgress:
    """``with LiveProgress(console) as progress: ... progress(study)`` redraws the tables."""

    def __init__(self, console: Console | None = None):
        self.live = Live(console=console, refresh_per_second=2, transient=True)

    def __enter__(self) -> LiveProgress:
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.live.stop()

    def __call__(self, study: optuna.Study) -> None:
        self.live.update(render(study), refresh=True)


class ArrayProgress:
    """``slurm.wait(job, timeout, on_poll=ArrayProgress(console, tasks, study))``: prints ``line`` when it
    changes, or after ``period`` seconds without a change."""

    def __init__(self, console: Console, tasks: int, study: optuna.Study, period: float = 60.0):
        self.console, self.tasks, self.study, self.period = console, tasks, study, period
        self.last, self.printed = "", -math.inf

    def line(self, states: list[str]) -> str:
        """``states``: squeue's state of each array task still in the queue (``slurm.active``)."""
        by = Counter(states)
        queued = by.pop("PENDING", 0) + by.pop("CONFIGURING", 0)
        running = by.pop("RUNNING", 0) + by.pop("COMPLETING", 0)
        other = "".join(f", {n} {state.lower()}" for state, n in sorted(by.items()))
        finished = max(0, self.tasks - len(states))
        n = counts(self.study)
        budget = self.study.user_attrs.get("config", {}).get("n_trials", "?")
        tasks = f"{queued} queued, {running} running, {finished} finished{other} of {self.tasks} tasks"
        return f"{self.study.study_name}: {tasks}; trials {n['done']}/{budget} done, {n['running']} running"

    def __call__(self, states: list[str]) -> None:
        line, now = self.line(states), time.monotonic()
        if line != self.last or now - self.printed >= self.period:
            self.console.print(f"{time.strftime('%H:%M:%S')} {line}", highlight=False)
            self.last, self.printed = line, now


def print_summary(summary: dict, console: Console | None = None) -> None:
    """The Pareto table (screening and final FID, cost) and where the report and the MLflow run are."""
    console = console or Console()
    view = summary["view"]
    samples, final = view.user_attrs.get("samples_per_trial"), view.user_attrs.get("final_samples")
    title = f"Pareto set of {summary['study']}: {summary.get('metric') or 'FID'} on {samples} samples, final on {final}"
    table = Table(title=title, title_justify="left")
    for column in ("#", "setting", "FID", "final FID", "GFLOPs", "vs CFG"):
        table.add_column(column, justify="left" if column == "setting" else "right", no_wrap=column == "setting")
    for row in summary["pareto"]:
        setting = label(row) + (" (baseline)" if row.get("baseline") else "")
        fid, final_fid = _num(row.get("fid"), "{:.2f}"), _num(row.get("fid_final"), "{:.2f}")
        cost = _num(row.get("gflops_per_sample"), "{:.4g}"), _num(row.get("relative_to_cfg"), "{:.3f}")
        table.add_row(str(row["number"]), setting, fid, final_fid, *cost)
    console.print(table)
    n = summary["counts"]
    console.print(f"trials: {n['complete']} complete, {n['done'] - n['complete']} failed; storage {summary['storage']}")
    console.print(f"report: {summary['report_dir']}")
    run_id = summary.get("mlflow_parent_run_id")
    if run_id:
        console.print(f"MLflow parent run: {run_id} ({summary['tracking_uri']})")
        experiment = summary.get("mlflow_experiment_id")
        url = experiment and tracking.ui_url(summary["tracking_uri"], experiment)
        if url:  # the runs table, where the trials are the parent's nested runs
            console.print(f"  runs table: {url}")
