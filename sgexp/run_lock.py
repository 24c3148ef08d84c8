"""One writer per run directory: ``RunLock`` (``<run_dir>/.lock``, created with O_EXCL, NFS-safe).

The lock names its holder (host, pid, SLURM job), so a second training on the same directory fails at
once naming it. A lock left by a dead process (same host and the pid gone, or an earlier run of the same
SLURM job, i.e. a requeue) is taken over with a message. ``sgexp.runs`` is the door to run directories;
this is the part of it that knows about processes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("sgexp.runs")
LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process trains in this run directory."""


def slurm_job() -> str | None:
    """``<array job>_<task>`` in an array task, the job id in a plain job (what ``scontrol requeue`` takes),
    None outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 on node7 (SLURM job 42) since 2026-12-01 10:00:00'."""
    job = f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job} since {holder.get('since')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/.lock``: one training process (global rank zero) writes to a run directory at a time.

    The file holds the holder as JSON (host, pid, SLURM job and restart, start time). It is created with
    O_EXCL (atomic on local filesystems and NFS v3+). A lock whose holder is certainly gone is taken over
    with a warning: same host and the pid is not running, or the same SLURM job with another
    ``SLURM_RESTART_COUNT`` (a requeued job's earlier run: SLURM ended it before starting this one). A
    holder on another host cannot be checked: the error says which file to delete if that process is gone.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _me(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job": slurm_job(),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def _stale(self, holder: dict[str, Any] | None) -> str | None:
        """Why the holder is certainly gone, or None if it may be alive."""
        if holder is None:  # empty or cut: its writer died between create and write, or it is being written
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            return "unreadable lock file older than 10 s" if age > 10 else None
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return f"pid {holder.get('pid')} is not running"
        job, restart = slurm_job(), os.environ.get("SLURM_RESTART_COUNT")
        if job is not None and holder.get("slurm_job") == job and holder.get("slurm_restart") != restart:
            return f"an earlier run of this SLURM job {job} (requeued)"
        return None

    def _create(self) -> bool:
        """Create the lock file with our identity; False if it exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self._me()))
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self.held = True
                return self
            holder = self.holder()
            why = self._stale(holder)
            if why is not None:
                log.warning("taking over the lock of %s: %s", self.path.parent, why)
                self.path.unlink(missing_ok=True)
            elif holder is None:
                time.sleep(1.0)  # being written this very moment
            else:
                raise RunDirectoryBusy(
                    f"run directory {self.path.parent} is in use by {describe_holder(holder)}: "
                    f"one training per run directory. If that process is gone, delete {self.path}"
                )
        raise RunDirectoryBusy(f"could not take {self.path}: another process keeps creating it")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder is None or (holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()):
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
