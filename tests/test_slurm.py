"""sgexp on a real single-node SLURM cluster: ``scripts/slurm/local_slurm.sh start`` (``make test-slurm`` starts it).

1. ``launcher=slurm`` submits a 2-task CPU DDP job (gloo, srun): Lightning runs in ``SLURMEnvironment`` with
   world size 2; the job ends with a checkpoint and an MLflow run.
2. ``sgexp.sweeps --slurm-array 2 --wait``: two array jobs share one Optuna journal and log to a real
   ``mlflow server``; every trial is run exactly once.

Requeue (SIGUSR1, plain ``scontrol requeue``, a lost node) is shown on the two-node cluster
(tests/test_slurm_two_node.py), with the same assertions and more.

One 2-task job fills this 2-core node, so jobs run one after another: every wait has a timeout.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from slurm_cluster import (
    STEPS,
    cluster_marks,
    node_states,
    sweep_array,
    train_on_slurm,
    wait_done,
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


def test_sweep_workers_as_a_job_array(cluster, uninterrupted):
    tmp, shards = cluster
    sweep = sweep_array(tmp / "sweep", shards, uninterrupted[1] / "checkpoints" / "last.ckpt")
    assert len(sweep.workers) == 2, sweep.workers  # both array tasks ran trials
