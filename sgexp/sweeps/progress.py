"""What the driving process shows: a live table of recent trials and the current Pareto set, with the
sampling pass running now (samples/s, ETA of the trial and of the study; log lines instead when the
console is not a terminal), then the final Pareto table; while ``--slurm-array K --wait`` waits, one line
per change of the array's tasks (queued, running, finished) or of the study's trials, and at least one per
``period`` (a log file is not silent for hours while jobs queue). Worker processes only write log lines."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from sgexp import tracking
from sgexp.diffusion.guidance import RULES
from sgexp.progress import LineProgress, Meter, format_seconds
from sgexp.sweeps.fidelity import finalists
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


@dataclass(frozen=True)
class Outlook:
    """What the study still has to run after the sampling pass now running: the study's ETA."""

    trials: int  # screening trials after this one
    trial_seconds: float  # mean wall time of a finished screening trial; nan: none yet (the pass's own time)
    finals: int  # finalists to re-score on ``final_samples`` after this pass
    final_samples: int

    @classmethod
    def of(cls, study: optuna.Study, samples: int) -> Outlook:
        """During screening: the trials left of the budget and the finalists of today's Pareto set (an
        estimate: the set changes as trials finish). Reads the storage once per pass, not per batch."""
        n, attrs = counts(study), study.user_attrs
        budget = attrs.get("config", {}).get("n_trials") or 0
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        seconds = [
            t.duration.total_seconds() for t in finished if t.duration and t.user_attrs.get("num_samples") == samples
        ]
        final_samples = attrs.get("final_samples") or 0
        finals = sum(f"final/{t.number}" not in attrs for t in finalists(study)) if final_samples else 0
        mean = sum(seconds) / len(seconds) if seconds else math.nan
        return cls(max(0, budget - n["done"] - n["running"]), mean, finals, final_samples)

    def seconds(self, samples: int, rate: float) -> float:
        """Seconds of everything after a pass of ``samples`` running at ``rate`` samples/s (nan: no rate yet)."""
        if not rate > 0:
            return math.nan
        trial = self.trial_seconds if math.isfinite(self.trial_seconds) else samples / rate
        return self.trials * trial + self.finals * self.final_samples / rate

    def describe(self) -> str:
        parts = [f"{self.trials} more trial{'s' * (self.trials > 1)}"] if self.trials else []
        parts += [f"{self.finals} finalist{'s' * (self.finals > 1)} to re-score"] if self.finals else []
        return ", ".join(parts) or "last pass"


class LiveProgress:
    """The driving process's view: ``with LiveProgress(console) as progress:``, then

    - ``progress(study)`` after each trial (every second while worker processes run) redraws the tables;
    - ``with progress.track(study, label, samples) as advance:`` around a sampling pass run in this process
      (a trial, or a finalist re-scored on more samples); ``advance(n)`` after each batch updates the pass's
      samples done, samples/s, its ETA and the study's (``Outlook``).

    On a terminal this is a ``rich.live.Live`` display. Otherwise (a log file, CI, ``reproduce``) nothing
    is redrawn: each pass writes log lines (``sgexp.progress.LineProgress``, a tenth or 30 s apart)
    ending with the study's ETA, and the driver logs each finished trial."""

    def __init__(self, console: Console | None = None, terminal: bool | None = None):
        self.console = console or Console()
        self.terminal = self.console.is_terminal if terminal is None else terminal
        self.live = Live(console=self.console, refresh_per_second=2, transient=True) if self.terminal else None
        self.tables: Group | None = None
        self.bar: Table | None = None

    def __enter__(self) -> LiveProgress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, study: optuna.Study) -> None:
        if self.live is not None:
            self.tables, self.bar = render(study), None
            self.live.update(self._view(), refresh=True)

    @contextmanager
    def track(
        self, study: optuna.Study, label: str, samples: int, passes_after: int | None = None
    ) -> Iterator[Callable[[int], None]]:
        """``passes_after``: passes of the same size that follow (the finalists' re-scoring); None: a
        screening trial, whose study ETA counts the trials left and the finalists (``Outlook.of``)."""
        later = Outlook.of(study, samples) if passes_after is None else Outlook(0, math.nan, passes_after, samples)

        def study_eta(rate: float, left: float) -> str:
            return f", study ETA {format_seconds(left + later.seconds(samples, rate))} ({later.describe()})"

        if self.live is None:
            yield LineProgress(label, samples, "samples", extra=study_eta).advance
            return
        self.tables = render(study)
        meter = Meter(samples)

        def advance(n: int) -> None:
            meter.done += n
            now = time.monotonic()
            rate, left = meter.rate(now), meter.seconds_left(now)
            self.bar = pass_bar(label, meter.done, samples, rate, f"ETA {format_seconds(left)}{study_eta(rate, left)}")
            self.live.update(self._view())  # drawn by Live's refresh thread, at most twice a second

        advance(0)
        yield advance

    def _view(self) -> Group:
        parts = [self.tables] if self.tables is not None else []
        return Group(*parts, *([self.bar] if self.bar is not None else []))


def pass_bar(label: str, done: int, total: int, rate: float, eta: str) -> Table:
    """``trial 7 sg w=5 ━━━━━━━━━━━━      12/48 samples  4.1 samples/s  ETA ...``"""
    row = Table.grid(padding=(0, 1))
    speed = f"{rate:.1f} samples/s" if math.isfinite(rate) else "- samples/s"
    row.add_row(label, ProgressBar(total=total, completed=done, width=30), f"{done}/{total} samples", speed, eta)
    return row


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
