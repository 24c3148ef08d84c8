"""SLURM batch jobs: render an sbatch script, submit it, wait for it; submit a training run (``launcher=slurm``).

sgexp writes its own sbatch scripts instead of going through hydra-submitit-launcher: the script is a
plain file kept in the run directory (read it, resubmit it by hand), the requeued job re-runs exactly that
file with its fixed run directory, and SIGUSR1 is handled by sgexp in step on all ranks (``sgexp.lit.stop``;
submitit would install its own USR1 handler and pickle the training function instead). Training jobs are
composed here (``submit_training``, called by ``python -m sgexp.train launcher=slurm``), sweep worker arrays
in ``sgexp.sweeps.array``.

What a job gets (``SbatchSpec``): nodes × tasks per node (one task per GPU, or per CPU process with
``gpus_per_node=0``: Lightning wants ``--ntasks-per-node`` = ``trainer.devices``), CPUs per task, memory,
time, partition/account/qos, ``--signal=USR1@<seconds>`` before the time limit (checkpoint + requeue),
``--requeue`` and ``--open-mode=append`` (the requeued job appends to the same log), an optional array,
extra ``#SBATCH`` lines and shell setup lines (``module load ...``). The script sets ``MASTER_ADDR`` (first
node) and ``MASTER_PORT`` (from the job id) for all tasks; NCCL's settings are the cluster's (``setup``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sgexp import runs, tracking
from sgexp.checks import check_positive_int, fail
from sgexp.config import LauncherConfig

TIME_FORMAT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM's [D-]HH[:MM[:SS]] or minutes


@dataclass
class SbatchSpec:
    """The ``#SBATCH`` header of one job (or job array)."""

    job_name: str
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None  # per node, e.g. "64G"; None: the partition's default
    time: str | None = None  # "2-00:00:00", "04:00:00" or minutes
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    signal_seconds: int | None = None  # --signal=USR1@N: N seconds before the time limit
    requeue: bool = True
    array: str | None = None  # e.g. "0-3" or "0-15%4"
    output: str | None = None  # log file pattern (%j job id, %A array id, %a task id)
    extra: list[str] = field(default_factory=list)  # more sbatch options, "--constraint=a100" or "#SBATCH ..."

    def __post_init__(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            check_positive_int(f"launcher.{name}", getattr(self, name))
        if isinstance(self.gpus_per_node, bool) or not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 0:
            raise fail("launcher.gpus_per_node", self.gpus_per_node, "must be an integer >= 0")
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise fail(
                "launcher.tasks_per_node",
                self.tasks_per_node,
                f"must equal launcher.gpus_per_node={self.gpus_per_node} (Lightning runs one task per GPU)",
            )
        if self.time is not None and not TIME_FORMAT.match(str(self.time)):
            raise fail("launcher.time", self.time, "must be SLURM time: minutes, HH:MM:SS or D-HH:MM:SS")
        if self.signal_seconds is not None:
            check_positive_int("launcher.signal_seconds", self.signal_seconds)

    def header(self) -> list[str]:
        options = [
            f"--job-name={self.job_name}",
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.tasks_per_node}",
            f"--cpus-per-task={self.cpus_per_task}",
        ]
        if self.gpus_per_node:
            options.append(f"--gpus-per-node={self.gpus_per_node}")
        for key in ("mem", "time", "partition", "account", "qos", "array", "output"):
            value = getattr(self, key)
            if value is not None:
                options.append(f"--{key}={value}")
        if self.signal_seconds:
            options.append(f"--signal=USR1@{self.signal_seconds}")  # to every task (srun steps), not the shell
        if self.requeue:
            options += ["--requeue", "--open-mode=append"]
        lines = [f"#SBATCH {o}" for o in options]
        lines += [e if e.startswith("#SBATCH") else f"#SBATCH {e}" for e in self.extra]
        return lines


def render(
    spec: SbatchSpec, command: Sequence[str], *, workdir: Path, setup: Sequence[str] = (), srun: bool = True
) -> str:
    """The batch script: header, environment, setup lines, then ``srun COMMAND`` (one task per device).

    ``srun`` starts nodes × tasks_per_node copies of the command; Lightning's ``SLURMEnvironment`` reads
    the rank and world size from their environment and the rendezvous from ``MASTER_ADDR``/``MASTER_PORT``,
    set here once for all tasks: the first node of the allocation and a port derived from the job id (the
    same on every requeue of the job; below the kernel's ephemeral range). ``setup`` lines (``module load``,
    ``conda activate``, ``export NCCL_...``) come after them, so they can override them.
    """
    quoted = " ".join(shlex.quote(str(c)) for c in command)
    rendezvous = [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"  # the first node',
        "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))",
        'echo "sgexp: rendezvous ${MASTER_ADDR}:${MASTER_PORT}"',
        "# NCCL (GPU jobs) is left to the cluster: set what your site documents in launcher.setup, e.g.",
        "#   export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5   (which interfaces carry the traffic)",
        "#   export NCCL_DEBUG=WARN                           (INFO to see the rings/trees it builds)",
    ]
    body = [
        "#!/bin/bash",
        f"# written by sgexp ({time.strftime('%Y-%m-%d %H:%M:%S')}); resubmit with: sbatch <this file>",
        *spec.header(),
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        "export PYTHONUNBUFFERED=1",
        "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}  # torch's threads per task",
        *(rendezvous if srun else []),
        'echo "sgexp: job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}, restart ${SLURM_RESTART_COUNT:-0}, $(date)"',
        *setup,
        f"srun --kill-on-bad-exit=1 {quoted}" if srun else quoted,
        "",
    ]
    return "\n".join(body)


def require_sbatch() -> str:
    """The sbatch executable, or a clear error before anything is written."""
    path = shutil.which("sbatch")
    if path is None:
        raise fail("launcher", "slurm", "needs `sbatch` on PATH (run on a SLURM login node)")
    return path


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT`` → the job id (``123`` or ``123`` for an array's parent)."""
    sbatch = require_sbatch()
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # "jobid[;cluster]"


def active(job_id: str) -> list[str]:
    """States of the job's (or array's) pending/running parts, [] once all have left the queue."""
    done = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%T"], capture_output=True, text=True, check=False)
    if done.returncode != 0:  # squeue forgets finished jobs: "Invalid job id specified"
        return []
    return done.stdout.split()


def wait(job_id: str, timeout: float, poll: float = 2.0, on_poll=None) -> None:
    """Block until job ``job_id`` (all array tasks) left the queue; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while states := active(job_id):
        if on_poll is not None:
            on_poll(states)
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still {sorted(set(states))} after {timeout:.0f} s")
        time.sleep(poll)


# --------------------------------------------------------------------------- training jobs


def training_spec(launcher: LauncherConfig, job_name: str) -> SbatchSpec:
    """The job of ``launcher=slurm``: the launcher's fields of the same names, and one task per GPU
    (``gpus_per_node``) or ``tasks_per_node`` CPU tasks on each node."""
    shared = {f.name: getattr(launcher, f.name) for f in fields(SbatchSpec) if hasattr(launcher, f.name)}
    shared["tasks_per_node"] = launcher.gpus_per_node or launcher.tasks_per_node
    return SbatchSpec(job_name=job_name, **shared)


def submit_training(
    cfg: DictConfig, overrides: Sequence[str], prepare: Callable[[], None] | None = None
) -> tuple[str, Path]:
    """Submit the training ``cfg`` (``launcher=slurm``) as a batch job; returns (job id, run directory).

    Cheap checks run here, on the login node, before anything is queued; then ``prepare`` (the caller's
    once-only work: datasets and classifiers every rank would otherwise race to create). The run
    directory is fixed now and passed to the job, so all ranks and every requeue of the job write to the
    same place (and the same MLflow run, whose id lives there). The job re-runs ``python -m sgexp.train``
    with ``overrides`` (the command line's), the run directory, the trainer's nodes × devices and
    ``launcher.submitted=true``; the script stays in ``<run_dir>/slurm/train.sbatch`` with the job logs
    ``<run_dir>/slurm/<job id>.out``.
    """
    launcher = OmegaConf.to_object(cfg.launcher) if isinstance(cfg.launcher, DictConfig) else cfg.launcher
    spec = training_spec(launcher, f"sgexp-{cfg.experiment}")
    require_sbatch()
    root = Path(cfg.paths.root).resolve()
    uri = tracking.tracking_uri_for(cfg.logger, root)
    if uri is not None:
        tracking.init_store(uri)
    if prepare is not None:
        prepare()
    run_dir, _ = runs.resolve_paths(cfg)
    job_dir = run_dir / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    spec.output = str(job_dir / "%j.out")
    fixed = {
        "paths.root": str(root),
        "paths.run_dir": str(run_dir),
        "launcher.submitted": "true",
        "trainer.num_nodes": str(spec.nodes),
        "trainer.devices": str(spec.tasks_per_node),
        "trainer.accelerator": "gpu" if spec.gpus_per_node else "cpu",
    }
    if spec.nodes * spec.tasks_per_node > 1:
        fixed["trainer.strategy"] = "ddp"
    if not any(o.startswith("trainer.progress=") for o in overrides):
        fixed["trainer.progress"] = "none"  # a live bar in a log file is noise; TrainingMonitor logs progress
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in fixed]
    command = [sys.executable, "-m", "sgexp.train", *kept, *(f"{k}={v}" for k, v in fixed.items())]
    script = job_dir / "train.sbatch"
    script.write_text(render(spec, command, workdir=Path.cwd(), setup=launcher.setup))
    job_id = submit(script)
    with open(job_dir / "jobs.txt", "a") as f:
        f.write(f"{job_id} {datetime.now().isoformat(timespec='seconds')}\n")
    return job_id, run_dir
