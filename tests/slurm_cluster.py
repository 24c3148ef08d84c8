"""Helpers of the tests on real SLURM clusters (tests/test_slurm.py: one node; tests/test_slurm_two_node.py).

``make test-slurm`` starts both clusters (scripts/slurm/local_slurm.sh: one node, the default config
/etc/slurm/slurm.conf; scripts/slurm/two_node_slurm.sh: two nodes, its own config named by ``SLURM_CONF``)
and runs these tests with ``SGEXP_REQUIRE_SLURM=1``: a missing cluster fails them instead of skipping.
Every SLURM client (sbatch, squeue, scontrol, and those inside the jobs) talks to the cluster that
``SLURM_CONF`` names, so a test module picks its cluster by setting that variable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ROOT, digits_run, mlflow_server
from mlflow.tracking import MlflowClient

from sgexp import slurm
from sgexp.sweeps.storage import open_storage

JOB_TIMEOUT = 300
STEPS = 120
TWO_NODE_CONF = Path(os.environ.get("TWO_NODE_SLURM_DIR", "/tmp/sgexp-2node")) / "etc" / "slurm.conf"


def controller_down(conf: Path) -> bool:
    """Nothing listens on the controller's address and port of ``conf`` (sinfo would retry for ~10 s)."""
    text = conf.read_text() if conf.is_file() else ""
    host = re.search(r"^SlurmctldHost=[^(\s]*\(([^)]+)\)", text, re.M)
    port = re.search(r"^SlurmctldPort=(\d+)", text, re.M)
    if host is None or port is None:
        return False  # not a config we know: let sinfo decide
    try:
        socket.create_connection((host.group(1), int(port.group(1))), timeout=2).close()
    except OSError:
        return True
    return False


def node_states(conf: Path | None = None) -> list[str] | None:
    """The state of every node if the cluster's controller answers (``*``: not responding), else None."""
    if shutil.which("sinfo") is None or (conf is not None and not conf.is_file()):
        return None
    if controller_down(conf or Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))):
        return None
    env = {**os.environ, **({"SLURM_CONF": str(conf)} if conf else {})}
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10, env=env)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.split() if done.returncode == 0 and done.stdout.split() else None


def cluster_marks(states: list[str] | None, nodes: int, start: str) -> list:
    """``slurm`` and a skip (or, with ``SGEXP_REQUIRE_SLURM=1``, an error) unless ``nodes`` nodes are up."""
    up = [s for s in states or [] if not s.endswith("*") and not s.startswith(("down", "drain", "fail"))]
    reason = f"needs a SLURM cluster of {nodes} node(s) up (sinfo: {states}): sudo {start}"
    if len(up) < nodes and os.environ.get("SGEXP_REQUIRE_SLURM") == "1":
        raise RuntimeError(f"SGEXP_REQUIRE_SLURM=1: {reason}")
    return [pytest.mark.slurm, pytest.mark.skipif(len(up) < nodes, reason=reason)]


def training_overrides(tmp: Path, shards: Path, *extra: str, launcher: bool = True) -> list[str]:
    """A 120-step digits run on CPU tasks, 1 CPU each; with ``launcher``: as 2 tasks on one node (what
    ``make train-slurm`` passes itself, ``launcher=slurm`` and the nodes and GPUs, is left out otherwise)."""
    training = [
        f"trainer.max_steps={STEPS}",
        "trainer.val_every_n_steps=60",
        "data.num_workers=1",
        "callbacks.monitor_every_n_steps=5",
        "callbacks.checkpoint.every_n_steps=1000",
        "callbacks.checkpoint.last_every_n_steps=50",
        "callbacks.guided_eval.train_classifier=false",
        "launcher.cpus_per_task=1",
        "launcher.time=30",  # sbatch's USR1 comes 300 s before the limit: only the tests send one, also under load
    ]
    if launcher:
        training += ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2"]
    return digits_run(tmp, shards, *training, *extra)


def submitted(done: subprocess.CompletedProcess) -> tuple[str, Path]:
    """(job id, run directory) from the output of a submission by ``sgexp.train``."""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    match = re.search(r"submitted SLURM job (\d+): run directory (\S+)", done.stdout)
    assert match, done.stdout
    return match.group(1), Path(match.group(2))


def train_on_slurm(tmp: Path, shards: Path, *extra: str) -> tuple[str, Path]:
    """``python -m sgexp.train launcher=slurm ...`` as a user types it; returns (job id, run directory)."""
    overrides = training_overrides(tmp, shards, *extra)
    done = subprocess.run(
        [sys.executable, "-m", "sgexp.train", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return submitted(done)


def job_log(run_dir: Path, job_id: str) -> str:
    path = run_dir / "slurm" / f"{job_id}.out"
    return path.read_text() if path.is_file() else ""


def wait_done(job_id: str, run_dir: Path) -> str:
    try:
        slurm.wait(job_id, JOB_TIMEOUT, poll=1.0)
    except TimeoutError:
        subprocess.run(["scancel", job_id], check=False)
        raise AssertionError(f"job {job_id} did not finish:\n{job_log(run_dir, job_id)[-4000:]}") from None
    return job_log(run_dir, job_id)


def wait_training(job_id: str, run_dir: Path) -> None:
    """Until the job's log shows a training step."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while not re.search(rf"step (\d+)/{STEPS}", job_log(run_dir, job_id)):
        assert time.monotonic() < deadline, job_log(run_dir, job_id)[-4000:]
        time.sleep(0.2)


def weights(ckpt: Path) -> tuple[int, dict]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    return state["global_step"], state["state_dict"]


def differing_tensors(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two checkpoints' state dicts (both must hold the same names)."""
    (_, x), (_, y) = weights(a), weights(b)
    assert x.keys() == y.keys()
    return [k for k in x if not torch.equal(x[k], y[k])]


@dataclass(frozen=True)
class Sweep:
    """What a finished sweep array left: the workers (``host:pid``) that ran trials, the number of finished
    trials (each ran once), the study's MLflow parent run."""

    workers: list[str]
    trials: int
    parent_run_id: str


def sweep_array(
    out: Path, shards: Path, checkpoint: Path, *slurm_args: str, storage: str = "", mlflow_backend: str | None = None
) -> Sweep:
    """``sgexp.sweeps --slurm-array 2 --wait`` on one Optuna storage (default: the journal ``out/study.log``) and a
    real ``mlflow server`` (backend store ``mlflow_backend``, default sqlite): every trial runs once, in both
    array tasks, each a child of the study's MLflow parent run, and the report is written."""
    out.mkdir()
    storage = storage or str(out / "study.log")
    with mlflow_server(out, mlflow_backend) as server:
        paths = [f"paths.root={ROOT}", f"paths.data_dir={shards}", f"paths.runs_dir={out / 'runs'}"]
        sampling = ["sampler.steps=3", "batch_size=24", "grid_size=10"]
        search = ["optuna.n_startup_trials=2", "heartbeat.interval=0.5", "heartbeat.timeout=20"]
        sets = [f"checkpoint={checkpoint}", *paths, *sampling, *search]
        args = ["--study", "sparsity_pareto", "--storage", storage, "--tracking-uri", server["uri"]]
        args += ["--n-trials", "10", "--samples", "24", "--final-samples", "0", *slurm_args]
        args += ["--slurm-array", "2", "--slurm-args=--time=10", "--wait", "--wait-timeout", str(JOB_TIMEOUT)]
        for item in sets:
            args += ["--set", item]
        done = subprocess.run(
            [sys.executable, "-m", "sgexp.sweeps", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        job_logs = "\n".join(p.read_text() for p in sorted((out / "runs/sweeps/sparsity_pareto/slurm").glob("*.out")))
        assert done.returncode == 0, done.stderr[-3000:] + job_logs[-3000:]

        study = optuna.load_study(study_name="sparsity_pareto", storage=open_storage(storage))
        finished = [t for t in study.trials if t.state.is_finished()]
        assert 10 <= len(finished) <= 11 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
        settings = [json.dumps(t.user_attrs["setting"], sort_keys=True) for t in finished]
        assert len(set(settings)) == len(settings), "a setting was evaluated twice"
        assert len(list((out / "runs/sweeps/sparsity_pareto/slurm").glob("*_[01].out"))) == 2

        client = MlflowClient(tracking_uri=server["uri"])
        parent = study.user_attrs["mlflow_parent_run_id"]
        children = client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
        )
        assert len(children) == len(finished)
    assert (out / "runs/sweeps/sparsity_pareto/report/summary.json").is_file()
    return Sweep(sorted({t.user_attrs["worker"] for t in finished}), len(finished), parent)
