"""Progress of a long pass (sampling, features, data preparation): items/s and ETA, shown by rank 0 only.

    with track("sampling sg", total=50_000) as advance:
        for batch in batches:
            ...
            advance(len(batch))

On a terminal (stdout is a tty) this is a ``rich.progress`` bar; otherwise (logs, SLURM,
CI, pipes) plain log lines on the ``sgexp.progress`` logger, one each time another
tenth is done or 30 s have passed, whichever comes first, so a log file shows how far a
50k-sample pass is without a line per batch. Other ranks get a no-op: their samples are
part of the same pass, and rank 0's rate times the world size is the total.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.distributed as dist
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

log = logging.getLogger(__name__)

LINE_EVERY_FRACTION = 0.1  # a plain line each time another tenth is done...
LINE_EVERY_SECONDS = 30.0  # ...or when this long has passed since the last one


def is_rank_zero() -> bool:
    """Rank 0 of an initialised process group, else of torchrun's ``RANK`` (a single process: True)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


class RateColumn(ProgressColumn):
    """``123.4 samples/s`` (rich's own speed column counts bytes)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:  # rich's estimate needs two updates: a one-batch pass has one
            speed = task.completed / task.elapsed
        return Text("-" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


def format_seconds(seconds: float) -> str:
    """``1:02:03``; ``?`` for nan (nothing done yet, so no rate)."""
    if seconds != seconds:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Meter:
    """Items done of a pass of ``total``, its rate and the time left at that rate."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic):
        self.total, self.clock = total, clock
        self.done, self.start = 0, clock()

    def rate(self, now: float) -> float:
        """Items per second since the start (nan before any time has passed)."""
        elapsed = now - self.start
        return self.done / elapsed if elapsed > 0 else float("nan")

    def seconds_left(self, now: float) -> float:
        """The rest of the pass at the rate so far (nan while nothing is done)."""
        rate = self.rate(now)
        return max(0, self.total - self.done) / rate if rate > 0 else float("nan")


class LineProgress(Meter):
    """The non-terminal display: a log line per tenth done or per 30 s, and one at the end.

    ``extra(rate, seconds_left)``, if given, adds to each line (a sweep adds its study's ETA)."""

    def __init__(
        self,
        description: str,
        total: int,
        unit: str,
        clock: Callable[[], float] = time.monotonic,
        extra: Callable[[float, float], str] | None = None,
    ):
        super().__init__(total, clock)
        self.description, self.unit, self.extra = description, unit, extra
        self.last_time, self.last_tenth = self.start, 0

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        tenth = int(self.done / self.total / LINE_EVERY_FRACTION) if self.total else 10
        if tenth > self.last_tenth or now - self.last_time >= LINE_EVERY_SECONDS:
            self.last_time, self.last_tenth = now, tenth
            self.line(now)

    def line(self, now: float) -> None:
        rate, left = self.rate(now), self.seconds_left(now)
        percent = 100 * self.done / self.total if self.total else 100
        log.info(
            "%s: %d/%d %s (%.0f%%), %.1f %s/s, elapsed %s, ETA %s%s",
            self.description,
            self.done,
            self.total,
            self.unit,
            percent,
            rate,
            self.unit,
            format_seconds(now - self.start),
            format_seconds(left),
            self.extra(rate, left) if self.extra is not None else "",
        )


@contextmanager
def track(
    description: str, total: int, unit: str = "samples", *, enabled: bool = True, terminal: bool | None = None
) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``: call it with the number of items each batch completed.

    ``enabled=False`` (or a rank other than 0) shows nothing; ``terminal`` overrides the
    ``sys.stdout.isatty()`` choice between the bar and the log lines (tests)."""
    if not enabled or not is_rank_zero():
        yield lambda n: None
        return
    if terminal is None:
        terminal = sys.stdout.isatty()
    if not terminal:
        yield LineProgress(description, total, unit).advance
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TimeElapsedColumn(),
    )
    # rich nests a second live display on the same console (e.g. inside a caller's own Progress)
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
