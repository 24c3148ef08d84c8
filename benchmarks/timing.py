"""Shared benchmark helpers: interleaved timing, machine description, JSON and tables.

Step times on the shared machines this project runs on drift by up to 30% within
a session, so compared variants are never timed one block after the other:
``time_interleaved`` runs them round-robin (A B, B A, A B, ...; the order flips
every round so that neither variant always runs first) and ``paired_ratio``
compares them round by round, so a slow spell slows both sides of a ratio.

Only torch, numpy and rich are needed (the GPU machine has nothing else).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the repeats: median and min–max (samples kept for the JSON)."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def to_dict(self) -> dict:
        return {"median": self.median, "min": self.min, "max": self.max, "samples": list(self.samples)}

    def scaled(self, factor: float) -> Stats:
        """The same measurements in other units (e.g. per sample, or as a rate via ``inverse``)."""
        return Stats(tuple(s * factor for s in self.samples))

    def inverse(self, numerator: float = 1.0) -> Stats:
        """Rates from times: ``numerator / seconds`` (e.g. images/s)."""
        return Stats(tuple(numerator / s for s in self.samples))


THREADS_HELP = (
    "torch CPU threads (default 1: on a shared machine a multi-threaded step stalls whenever another "
    "process holds one of its cores, 2-9x here; 0 = torch's default)"
)


def set_threads(threads: int) -> None:
    """``torch.set_num_threads`` unless 0 (keep torch's default); recorded by ``machine_info``."""
    if threads > 0:
        torch.set_num_threads(threads)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Seconds per call of ``fn`` (``inner`` calls back to back, averaged).

    On CUDA the interval is measured with events around the calls after a
    synchronize, so queued work from before does not leak in and the kernels
    launched by ``fn`` are all counted.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_interleaved(
    variants: Mapping[str, Callable[[], object]],
    repeats: int = 7,
    warmup: int = 2,
    inner: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, Stats]:
    """Seconds per call of every variant, measured round-robin.

    ``warmup`` interleaved calls of each variant first (allocator, kernel
    selection, lazy initialisation), then ``repeats`` rounds; round ``r`` runs
    the variants in order when r is even and in reverse when odd (ABBA), so a
    linear drift affects every variant alike.
    """
    device = torch.device(device)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    _synchronize(device)
    gc.collect()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(time_call(variants[name], device, inner))
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def paired_ratio(numerator: Stats, denominator: Stats) -> Stats:
    """Round-by-round ratios of two interleaved measurements (drift cancels within a round)."""
    return Stats(tuple(a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)))


def realised_fraction(measured_ratio: float, analytic_ratio: float) -> float:
    """Share of the analytic saving that the measurement realises: (1 − t_b/t_a) / (1 − F_b/F_a)."""
    saving = 1.0 - analytic_ratio
    return (1.0 - measured_ratio) / saving if saving > 0 else float("nan")


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git() -> dict:
    """Commit and whether the tree has uncommitted changes (read-only git calls; absent on bare copies)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        # A copy without .git (e.g. the device machine): the launcher may pass the commit along.
        return {"commit": os.environ.get("SGEXP_GIT_COMMIT"), "dirty": None}


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on: CPU, cores, threads, torch, GPU, git commit, load."""
    device = torch.device(device)
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git": _git(),
    }
    if torch.cuda.is_available():
        index = device.index if device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


# ----------------------------------------------------------------------------- output


def results_dir(out: str | os.PathLike | None = None) -> Path:
    """``out`` if given, else ``$OUT`` (the device machine's return folder), else benchmarks/results/."""
    path = Path(out) if out else Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_RESULTS
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(name: str, payload: dict, out: str | os.PathLike | None = None) -> Path:
    """``<results>/<name>.json``; non-finite floats become null so any JSON reader accepts the file."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path = results_dir(out) / f"{name}.json"
    path.write_text(json.dumps(clean(payload), indent=2) + "\n")
    return path


def console():
    """A rich console that stays wide when stdout is a file or a pipe (make, CI logs)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 180)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> None:
    """A rich table; the first column left-aligned, the numbers right-aligned."""
    from rich.markup import escape
    from rich.table import Table

    # escape: "[min–max]" in a cell or caption would otherwise be read as rich markup and vanish
    table = Table(title=escape(title), caption=escape(caption) or None, caption_justify="left")
    for i, column in enumerate(columns):
        table.add_column(escape(column), justify="left" if i == 0 else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(v)) for v in row))
    console().print(table)


def fmt_ms(stats: Stats) -> str:
    """``12.3 [11.9–13.0]``: median and min–max in milliseconds."""
    return f"{stats.median * 1e3:.1f} [{stats.min * 1e3:.1f}–{stats.max * 1e3:.1f}]"


def fmt_pct(value: float | None) -> str:
    """A share such as MFU; ``n/a`` when unknown (None or NaN: no known peak, e.g. on a CPU)."""
    return "n/a" if value is None or value != value else f"{value:.1%}"


def fmt_range(stats: Stats, digits: int = 2) -> str:
    return f"{stats.median:.{digits}f} [{stats.min:.{digits}f}–{stats.max:.{digits}f}]"


def log(message: str) -> None:
    """Progress on stdout, flushed at once (benchmarks run under make, pipes and remote shells)."""
    print(message, flush=True)
