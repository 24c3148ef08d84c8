"""Sweep workers as a SLURM job array: ``python -m sgexp.sweeps --study X --slurm-array K``.

The submitting process (a login node) does everything cheap and shared once: it checks the config,
storage, tracking URI and checkpoint, creates or resumes the study, opens the MLflow parent run and
enqueues the baselines (``driver.start``). It then writes ``runs/sweeps/<study>/slurm/workers.sbatch``, an
array of K one-task jobs; each task runs ``python -m sgexp.sweeps ... --slurm-worker``, which loads the
model once and loops ask -> score -> tell on the study's storage until the budget is met
(``driver.work``). Optuna hands each enqueued or sampled trial to exactly one worker; the heartbeat
re-enqueues trials of workers that die (a preempted or requeued array task just joins again).

Storage: the journal file must be on a filesystem every node sees (the default ``runs/optuna/<study>.log``
is, when the repository is on a shared home or project directory), or an RDB URL. MLflow: many writers on
one sqlite file over NFS corrupt it; give workers a server (``--tracking-uri http://login-node:5000``).
``--wait`` blocks until the array has finished, then re-scores the Pareto set and writes the report;
without it, ``--report`` does that from the login node at any time. Rendering, submitting and waiting for
sbatch scripts: ``sgexp.slurm``.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import torch

from sgexp import slurm
from sgexp.checks import check_positive_int, fail
from sgexp.sweeps import driver
from sgexp.sweeps.study import load_study

log = logging.getLogger("sgexp.sweeps.array")


def worker_command(study: str, overrides: list[str], storage_url: str, tracking_uri: str | None) -> list[str]:
    """What each array task runs: the same study and overrides, the storage and tracking URI fixed."""
    command = [sys.executable, "-m", "sgexp.sweeps", "--study", study, "--storage", storage_url, "--slurm-worker"]
    if tracking_uri:
        command += ["--tracking-uri", tracking_uri]
    for item in overrides:
        command += ["--set", item]
    return command


def submit(
    session: driver.Session, study: str, overrides: list[str], tasks: int, cpus_per_task: int, sbatch_args: str = ""
) -> tuple[str, Path]:
    """Write and submit the worker array of a started study; returns (array job id, script)."""
    check_positive_int("slurm_array", tasks)
    if "://" in session.storage_url and session.storage_url.startswith("sqlite"):
        log.warning("an sqlite Optuna storage shared by %d jobs is fragile: prefer the journal file", tasks)
    job_dir = session.out_dir / "slurm"
    job_dir.mkdir(parents=True, exist_ok=True)
    spec = slurm.SbatchSpec(
        job_name=f"sgexp-sweep-{session.cfg.name}",
        cpus_per_task=cpus_per_task,
        array=f"0-{tasks - 1}",
        output=str(job_dir / "%A_%a.out"),
        extra=shlex.split(sbatch_args),
    )
    command = worker_command(study, overrides, session.storage_url, session.tracking_uri)
    script = job_dir / "workers.sbatch"
    script.write_text(slurm.render(spec, command, workdir=Path.cwd(), srun=False))
    return slurm.submit(script), script


def run_worker(study: str, overrides: list[str], storage_url: str, tracking_uri: str | None) -> int:
    """Body of one array task: ``SLURM_ARRAY_TASK_ID`` joins its sampler seed (``space.process_seed``), its CPUs
    set torch's threads."""
    if not storage_url:
        raise fail("storage", storage_url, "a worker needs the study's --storage (the submission passes it)")
    cfg = load_study(study, overrides)
    k = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
    log.info("sweep worker %d of study %s on %s", k, cfg.name, storage_url)
    return driver.work(cfg, storage_url, tracking_uri, k)
