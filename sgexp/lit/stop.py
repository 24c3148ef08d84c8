"""Stop on a signal at a step boundary, in step on all ranks, with a checkpoint on disk first.

Signals: SIGINT (Ctrl-C) and SIGTERM (``kill``, SLURM preemption and time limit) -> save
``checkpoints/last.ckpt`` and stop; SIGUSR1 inside a SLURM job (``sbatch --signal=USR1@<seconds>``) ->
save ``<run_dir>/hpc_ckpt_<n>.ckpt``, ``scontrol requeue`` the job and stop. A second Ctrl-C while the
first is pending interrupts at once (the last checkpoint on disk is then the newest state).

Why not Lightning's own handling: its SLURM auto-requeue saves the checkpoint inside the signal handler,
wherever each rank happens to be (one rank in the gradient all-reduce, another in the checkpoint's barrier:
the job hung until SLURM killed it, seen with gloo on 2 ranks); its SIGTERM handler broadcasts from inside
the handler, and Ctrl-C exits "gracefully" without a checkpoint. Here the handler only records the signal;
after every training batch, *before* any evaluation or periodic checkpoint of that step (this callback
comes first), the ranks agree on the strongest signal any of them got (one scalar all-reduce), all save
together, and every rank raises ``TrainingStopped``, which ``sgexp.train`` turns into a clean exit. The
next start of the same command resumes from the checkpoint (``sgexp.runs``).
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch

from sgexp.runs import slurm_job

log = logging.getLogger(__name__)

# the order decides which wins when ranks got different signals: a requeue beats a plain stop
PRIORITY = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3}
BY_PRIORITY = {v: k for k, v in PRIORITY.items()}


class TrainingStopped(Exception):
    """Training stopped on a signal after its checkpoint was saved (raised on every rank)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, requeued: bool):
        self.signum, self.step, self.checkpoint, self.requeued = signum, step, checkpoint, requeued
        name = signal.Signals(signum).name
        then = "the job was requeued" if requeued else "run the same command to continue"
        super().__init__(f"stopped by {name} at step {step}: checkpoint {checkpoint}; {then}")


def next_hpc_checkpoint(run_dir: Path) -> Path:
    numbers = [int(m.group(1)) for p in run_dir.glob("hpc_ckpt_*.ckpt") if (m := re.match(r"hpc_ckpt_(\d+)", p.stem))]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_job() -> bool:
    """``scontrol requeue`` this job; False (logged with SLURM's message) if SLURM refused."""
    try:
        done = subprocess.run(["scontrol", "requeue", slurm_job()], capture_output=True, text=True, check=False)
    except OSError as err:
        log.error("scontrol requeue %s failed: %s", slurm_job(), err)
        return False
    if done.returncode != 0:
        log.error("scontrol requeue %s failed: %s", slurm_job(), (done.stderr or done.stdout).strip())
    return done.returncode == 0


class StopOnSignal(L.Callback):
    """On SIGINT/SIGTERM (and SIGUSR1 under SLURM): checkpoint at the next step boundary, then stop.

    Put it first in the callback list: its ``on_train_batch_end`` must run before evaluations and periodic
    checkpoints of the same step, which could use up SLURM's grace time.
    """

    def __init__(self, run_dir: str | Path, slurm: bool = False):
        self.run_dir = Path(run_dir)
        self.signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGUSR1] if slurm else [])
        self.received = 0  # PRIORITY of the strongest signal received, 0: none
        self._previous: dict[int, object] = {}

    def _install(self) -> None:
        for signum in self.signals:
            previous = signal.signal(signum, self._on_signal)
            self._previous.setdefault(signum, previous)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._install()  # early: a SIGUSR1 while the checkpoint loads must not kill the job (its default)

    def on_train_start(self, trainer, pl_module) -> None:
        self._install()  # again: Lightning installs its SIGTERM handler after `setup` (it restores ours after)

    def restore(self) -> None:
        """Put back the handlers found at ``setup``. Also called by ``sgexp.train`` after ``fit``: on an
        exception Lightning skips ``teardown`` and restores the handlers it found, which were ours."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.restore()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == PRIORITY[signal.SIGINT]:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step to end
        if signum == signal.SIGTERM:
            # SLURM sends SIGTERM to every process of the step, data-loader workers included; PyTorch's SIGCHLD
            # handler would raise mid-step when they die, before the checkpoint. The batch in hand is enough.
            self._previous.setdefault(signal.SIGCHLD, signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        self.received = max(self.received, PRIORITY[signal.Signals(signum)])  # nothing else here (see above)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        agreed = trainer.strategy.reduce(torch.tensor(float(self.received), device=pl_module.device), reduce_op="max")
        if not int(agreed):
            return
        signum = BY_PRIORITY[int(agreed)]
        step = trainer.global_step
        requeue = signum == signal.SIGUSR1
        path = next_hpc_checkpoint(self.run_dir) if requeue else self.run_dir / "checkpoints" / "last.ckpt"
        if trainer.is_global_zero:
            log.info("%s: saving %s at step %d", signal.Signals(signum).name, path, step)
        trainer.save_checkpoint(path)  # every rank calls it; rank zero writes
        if requeue:
            requeued = trainer.strategy.broadcast(requeue_job() if trainer.is_global_zero else False, src=0)
            if not requeued:  # train on: SLURM ends the job at its limit, the checkpoint is on disk
                log.error("the job was not requeued; %s is kept: resubmit the same command to continue", path)
                self.received = 0
                return
            if trainer.is_global_zero:
                log.info("requeued SLURM job %s: it resumes from %s", slurm_job(), path.name)
        flush_step_metrics(trainer)
        raise TrainingStopped(signum, step, path, requeued=requeue)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stop signal that came while the main process waited for a batch. SLURM's SIGTERM reaches the
        loader workers too, and a worker that dies while handing over a batch makes the fetch fail before any
        batch-end hook runs. The last step is complete, so rank zero saves it as ``last.ckpt`` here, without
        collective calls (the other ranks fail the same way, or are gone); the requeued job resumes from it."""
        signum = BY_PRIORITY.get(self.received)
        if signum not in (signal.SIGINT, signal.SIGTERM) or isinstance(exception, (TrainingStopped, KeyboardInterrupt)):
            return
        if not trainer.is_global_zero or trainer.global_step == 0:
            return
        path = self.run_dir / "checkpoints" / "last.ckpt"
        try:
            checkpoint = (
                trainer._checkpoint_connector.dump_checkpoint()
            )  # Lightning has no public call without a barrier
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        except Exception as err:  # the original error is what the user must see
            log.error("%s during a failed step: could not save %s: %s", signal.Signals(signum).name, path, err)
            return
        log.warning(
            "%s while loading the next batch (%s): saved %s at step %d",
            signal.Signals(signum).name,
            type(exception).__name__,
            path,
            trainer.global_step,
        )


def flush_step_metrics(trainer) -> None:
    """Send this step's logged metrics now: Lightning sends them after the batch-end hooks, which the raise
    skips, and the metric history would miss the step the run stopped at. (Lightning has no public call.)"""
    connector = trainer._logger_connector
    try:
        connector.log_metrics(connector.metrics["log"])
    except Exception as err:  # never let bookkeeping prevent the stop
        log.warning("could not log the metrics of the last step: %s", err)
