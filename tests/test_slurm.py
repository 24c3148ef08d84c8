"""sgexp on a real single-node SLURM cluster: ``scripts/slurm/local_slurm.sh start`` (``make test-slurm`` starts it).

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

import re
import subprocess

import pytest
import torch
from mlflow.tracking import MlflowClient
from slurm_cluster import (
    STEPS,
    cluster_marks,
    node_states,
    sweep_array,
    train_on_slurm,
    wait_done,
    wait_training,
    weights,
)

from sgexp.data import ensure_prepared
from sgexp.eval import train_classifier

pytestmark = cluster_marks(node_states(), 1, "scripts/slurm/local_slurm.sh start")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Digits shards, a barely trained digits classifier (domain FID of the sweep) and the MLflow store."""
    tmp = tmp_path_factory.mktemp("slurm")
    shards = tmp / "shards"
    train_classifier(ensure_prepared("digits", shards), epochs=1)
    return tmp, shards


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
    workers = sweep_array(tmp / "sweep", shards, uninterrupted[1] / "checkpoints" / "last.ckpt")
    assert len(workers) == 2, workers  # both array tasks ran trials
