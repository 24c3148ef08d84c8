"""sgexp on a real SLURM cluster: ``scripts/slurm/local_slurm.sh start`` (``.ci/run`` starts one).

1. ``launcher=slurm`` submits a 2-task CPU DDP job (gloo, srun): Lightning runs in ``SLURMEnvironment`` with
   world size 2; the job ends with a checkpoint and an MLflow run.
2. SIGUSR1 to a running job: it checkpoints, is requeued, resumes in the same run directory and ends at the
   same global step, in the same MLflow run, with the same weights as the uninterrupted job of test 1.
   The same for a plain ``scontrol requeue`` without a signal first.
3. ``sgexp.sweeps --slurm-array 2 --wait``: two array jobs share one Optuna journal and log to a real
   ``mlflow server``; every trial is run exactly once.

One 2-task job fills this 2-core node, so jobs run one after another: every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import ROOT, digits_run, mlflow_server
from mlflow.tracking import MlflowClient

from sgexp import slurm
from sgexp.data import ensure_prepared
from sgexp.eval import train_classifier
from sgexp.sweeps.storage import open_storage


def cluster_state() -> str | None:
    """The node's state if a SLURM controller answers, else None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else None


STATE = cluster_state()
if os.environ.get("SGEXP_REQUIRE_SLURM") == "1" and (STATE is None or STATE.endswith("*")):
    raise RuntimeError(f"SGEXP_REQUIRE_SLURM=1 but no SLURM cluster answers (sinfo: {STATE})")
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        STATE is None or STATE.endswith("*") or STATE.startswith(("down", "drain")),
        reason=f"no SLURM cluster running (sinfo: {STATE}): sudo scripts/slurm/local_slurm.sh start",
    ),
]
JOB_TIMEOUT = 300
STEPS = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Digits shards, a barely trained digits classifier (domain FID of the sweep) and the MLflow store."""
    tmp = tmp_path_factory.mktemp("slurm")
    shards = tmp / "shards"
    train_classifier(ensure_prepared("digits", shards), epochs=1)
    return tmp, shards


def train_on_slurm(tmp: Path, shards: Path, *extra: str) -> tuple[str, Path]:
    """``python -m sgexp.train launcher=slurm ...`` as a user types it; returns (job id, run directory)."""
    training = [
        f"trainer.max_steps={STEPS}",
        "trainer.val_every_n_steps=60",
        "data.num_workers=1",
        "callbacks.monitor_every_n_steps=5",
        "callbacks.checkpoint.every_n_steps=1000",
        "callbacks.checkpoint.last_every_n_steps=50",
        "callbacks.guided_eval.train_classifier=false",
    ]
    launcher = ["launcher=slurm", "launcher.gpus_per_node=0", "launcher.tasks_per_node=2", "launcher.cpus_per_task=1"]
    overrides = digits_run(tmp, shards, *training, *launcher, "launcher.time=10", *extra)
    done = subprocess.run(
        [sys.executable, "-m", "sgexp.train", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"submitted SLURM job (\d+): run directory (\S+)", done.stdout)
    assert match, done.stdout
    return match.group(1), Path(match.group(2))


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


@pytest.fixture(scope="module")
def uninterrupted(cluster):
    tmp, shards = cluster
    job_id, run_dir = train_on_slurm(tmp / "a", shards)
    return job_id, run_dir, wait_done(job_id, run_dir)


def test_ddp_training_job(uninterrupted):
    job_id, run_dir, text = uninterrupted
    assert "cluster environment: SLURMEnvironment, world size 2, global rank 0" in text, text[-4000:]
    assert "global rank 1" in text and "distributed_backend=gloo" in text
    assert (run_dir / "slurm" / "train.sbatch").read_text().count("--ntasks-per-node=2") == 1
    step, _ = weights(run_dir / "checkpoints" / "last.ckpt")
    assert step == STEPS
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parents[2] / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sgexp.cluster_environment"] == "SLURMEnvironment" and run.data.tags["sgexp.world_size"] == "2"
    assert run.data.params["trainer.devices"] == "2" and run.data.params["launcher.name"] == "slurm"


def test_usr1_checkpoints_requeues_and_resumes(cluster, uninterrupted):
    tmp, shards = cluster
    job_id, run_dir = train_on_slurm(tmp / "b", shards)
    wait_training(job_id, run_dir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    text = wait_done(job_id, run_dir)

    assert "SIGUSR1: saving" in text and f"requeued SLURM job {job_id}" in text, text[-4000:]
    assert "stopped by SIGUSR1 at step" in text  # it stops once requeued, instead of training on until killed
    assert f"job {job_id} on" in text and "restart 1" in text  # the same job ran again
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file()
    interrupted_at, _ = weights(run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < interrupted_at < STEPS and "resuming from hpc" in text
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id

    step, state = weights(run_dir / "checkpoints" / "last.ckpt")
    ref_step, ref_state = weights(uninterrupted[1] / "checkpoints" / "last.ckpt")
    assert step == ref_step == STEPS
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state), "the resumed run diverged from the reference"

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'b' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    [experiment] = [e for e in client.search_experiments() if e.name == "sgexp"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # one run across the requeue
    history = [m.step for m in client.get_metric_history(run_id, "train/images_per_s")]
    assert min(history) < interrupted_at < max(history) <= STEPS


def test_plain_scontrol_requeue_resumes_from_the_newest_checkpoint(cluster, uninterrupted):
    """``scontrol requeue JOBID`` with no signal first (an admin, a failed node): SLURM ends the job (SIGTERM
    to the tasks), the tasks save ``last.ckpt`` at the next step and exit, the job runs again and continues
    from the newest checkpoint; it ends bit-identical to the uninterrupted job, in one MLflow run."""
    tmp, shards = cluster
    job_id, run_dir = train_on_slurm(tmp / "c", shards)
    wait_training(job_id, run_dir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    text = wait_done(job_id, run_dir)

    assert "restart 1" in text and not list(run_dir.glob("hpc_ckpt_*.ckpt")), text[-4000:]
    resumed = re.search(r"resuming from (\S+), step (\d+)", text)
    assert resumed and 0 < int(resumed.group(2)) < STEPS, text[-4000:]  # not a restart at step 0
    step, state = weights(run_dir / "checkpoints" / "last.ckpt")
    ref_step, ref_state = weights(uninterrupted[1] / "checkpoints" / "last.ckpt")
    assert step == ref_step == STEPS
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state), "the requeued run diverged"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'c' / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["sgexp.slurm_restart_count"] == "1"
    [experiment] = [e for e in client.search_experiments() if e.name == "sgexp"]
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_sweep_workers_as_a_job_array(cluster, uninterrupted):
    tmp, shards = cluster
    checkpoint = uninterrupted[1] / "checkpoints" / "last.ckpt"
    out = tmp / "sweep"
    out.mkdir()
    with mlflow_server(out) as server:
        paths = [f"paths.root={ROOT}", f"paths.data_dir={shards}", f"paths.runs_dir={out / 'runs'}"]
        sampling = ["sampler.steps=3", "batch_size=24", "grid_size=10"]
        search = ["optuna.n_startup_trials=2", "heartbeat.interval=0.5", "heartbeat.timeout=20"]
        sets = [f"checkpoint={checkpoint}", *paths, *sampling, *search]
        args = ["--study", "sparsity_pareto", "--storage", str(out / "study.log"), "--tracking-uri", server["uri"]]
        args += ["--n-trials", "10", "--samples", "24", "--final-samples", "0"]
        args += ["--slurm-array", "2", "--slurm-args=--time=10", "--wait", "--wait-timeout", str(JOB_TIMEOUT)]
        for item in sets:
            args += ["--set", item]
        done = subprocess.run(
            [sys.executable, "-m", "sgexp.sweeps", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        job_logs = "\n".join(p.read_text() for p in sorted((out / "runs/sweeps/sparsity_pareto/slurm").glob("*.out")))
        assert done.returncode == 0, done.stderr[-3000:] + job_logs[-3000:]

        study = optuna.load_study(study_name="sparsity_pareto", storage=open_storage(str(out / "study.log")))
        finished = [t for t in study.trials if t.state.is_finished()]
        assert 10 <= len(finished) <= 11 and all(t.state == optuna.trial.TrialState.COMPLETE for t in finished)
        settings = [json.dumps(t.user_attrs["setting"], sort_keys=True) for t in finished]
        assert len(set(settings)) == len(settings), "a setting was evaluated twice"
        hosts = {t.user_attrs["worker"] for t in finished}
        assert len(hosts) == 2, hosts  # both array tasks ran trials
        assert len(list((out / "runs/sweeps/sparsity_pareto/slurm").glob("*_[01].out"))) == 2

        client = MlflowClient(tracking_uri=server["uri"])
        parent = study.user_attrs["mlflow_parent_run_id"]
        children = client.search_runs(
            [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
        )
        assert len(children) == len(finished)
    assert (out / "runs/sweeps/sparsity_pareto/report/summary.json").is_file()
