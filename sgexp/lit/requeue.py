"""Checkpoint and requeue a SLURM job on SIGUSR1 (``sbatch --signal=USR1@<seconds>``), in step with all ranks.

Lightning's own auto-requeue saves the checkpoint inside the signal handler. Under DDP the handler runs
wherever each rank happens to be: one rank may be in the gradient all-reduce while another enters the
checkpoint's barrier, and the job hangs until SLURM kills it (seen here with gloo on 2 ranks). This
callback's handler only sets a flag; after every training batch the ranks agree on "did any rank get the
signal" (one tiny all-reduce), then all of them save ``<run_dir>/hpc_ckpt_<n>.ckpt`` together at the same
step and global rank zero calls ``scontrol requeue``. The requeued job starts from that checkpoint (Lightning
resumes from the newest ``hpc_ckpt_*`` under ``default_root_dir``; ``sgexp.train.requeue_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


def job_id() -> str:
    """``<array job>_<task>`` for an array task, else the job id: what ``scontrol requeue`` takes."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]


def next_hpc_checkpoint(run_dir: Path) -> Path:
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := re.match(r"hpc_ckpt_(\d+)", p.stem))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class RequeueOnSignal(L.Callback):
    """On SIGUSR1 (any rank): checkpoint at the next step boundary on all ranks, then requeue the job."""

    def __init__(self, run_dir: str | Path, signum: int = signal.SIGUSR1):
        self.run_dir = Path(run_dir)
        self.signum = signum
        self.requested = False
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.requested = True  # nothing else here: see the module docstring

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        path = next_hpc_checkpoint(self.run_dir)
        log.info("SIGUSR1: saving %s at step %d, then requeueing", path, trainer.global_step)
        trainer.save_checkpoint(path)  # every rank calls it; rank zero writes
        if trainer.is_global_zero:
            done = subprocess.run(["scontrol", "requeue", job_id()], capture_output=True, text=True, check=False)
            if done.returncode == 0:
                log.info("requeued SLURM job %s: it resumes from %s", job_id(), path.name)
            else:
                log.error("scontrol requeue %s failed: %s", job_id(), done.stderr.strip())
        self.requested = False  # and train on: SLURM ends the job in a moment (if requeue failed, nothing is lost)
