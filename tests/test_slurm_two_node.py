"""sgexp on a real two-node SLURM cluster: ``scripts/slurm/two_node_slurm.sh start`` (``make test-slurm``).

The cluster runs on this machine: one controller and two ``slurmd``, each in its own UTS and mount
namespace (hostnames sg-node1 and sg-node2, a private /etc/hosts in which both names resolve to their
own loopback addresses), with its own ports, munge and config (``SLURM_CONF``). Every job step is forked
by its node's slurmd, so training tasks see their node's hostname and SLURM's per-node variables as on
a real cluster; they share this machine's cores, filesystem and loopback network (gloo over TCP).

1. ``make train-slurm NODES=2 GPUS=0``: one DDP job over both nodes, one task per node: world size 2,
   node ranks 0 and 1, one run directory, one MLflow run, a checkpoint; its weights equal the same
   2-task job on one node bit for bit (same global batch and seeds; gloo's sum of two tensors does not
   depend on which rank adds first).
2. ``scancel --signal=USR1`` and a plain ``scontrol requeue`` of the running 2-node job: it is requeued,
   runs again on both nodes, resumes from the newest checkpoint and ends bit-identical to test 1's job,
   in one MLflow run whose metric history spans the interruption; ``SLURM_RESTART_COUNT`` is tagged.
3. A sweep array of 2 one-node tasks: a worker on each node, one study, one MLflow server; shown twice: on
   an Optuna journal on the shared filesystem (an sqlite MLflow store), and on a real PostgreSQL server
   (tests/postgres_server.py) as both the Optuna storage and the MLflow server's backend store.
4. sg-node2 lost mid-job (frozen, then brought back): SLURM requeues the job, it resumes from the newest
   checkpoint on both nodes and ends like the uninterrupted job.

One 2-node job takes both nodes' (shared) 2 cores, so the jobs run one after another.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy
from conftest import ROOT
from mlflow.tracking import MlflowClient
from postgres_server import postgres_server
from slurm_cluster import (
    JOB_TIMEOUT,
    STEPS,
    TWO_NODE_CONF,
    Sweep,
    cluster_marks,
    differing_tensors,
    job_log,
    node_states,
    submitted,
    sweep_array,
    train_on_slurm,
    training_overrides,
    wait_done,
    wait_training,
    weights,
)

from sgexp.data import ensure_prepared
from sgexp.eval import train_classifier

pytestmark = cluster_marks(node_states(TWO_NODE_CONF), 2, "scripts/slurm/two_node_slurm.sh start")
NODES = ["sg-node1", "sg-node2"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Digits shards and their classifier (the domain FID that ends each training is gathered over both
    nodes); every SLURM client of this module (here and in the jobs) talks to the two-node cluster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(TWO_NODE_CONF))
        tmp = tmp_path_factory.mktemp("slurm2")
        shards = tmp / "shards"
        train_classifier(ensure_prepared("digits", shards), epochs=1)
        yield tmp, shards


def make_train_slurm(tmp: Path, shards: Path, nodes: int = 2) -> tuple[str, Path]:
    """``make train-slurm EXP=mnist_tread NODES=2 GPUS=0 ARGS=...`` as a user types it: one CPU task per node."""
    args = " ".join(training_overrides(tmp, shards, launcher=False))
    done = subprocess.run(
        ["make", "--no-print-directory", "train-slurm", "EXP=mnist_tread", f"NODES={nodes}", "GPUS=0", f"ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return submitted(done)


def training_tasks(job_id: str) -> dict[int, tuple[str, str, str]]:
    """Global rank → (SLURM_NODEID, SLURMD_NODENAME, hostname) of the job's training processes, read from
    /proc while they run: their environment (what Lightning's ``SLURMEnvironment`` reads its node rank
    from) and the hostname of their UTS namespace (the node they were started on)."""
    tasks = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not (Path(argv[0].decode()).name.startswith("python") and b"sgexp.train" in argv):
                continue
            pairs = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            continue
        env = dict(p.split("=", 1) for p in pairs if "=" in p)
        if env.get("SLURM_JOB_ID") != job_id or "SLURM_PROCID" not in env or env.get("SLURM_STEP_ID") == "batch":
            continue
        host = subprocess.run(["nsenter", "-t", proc.name, "-u", "hostname"], capture_output=True, text=True)
        if host.returncode == 0:
            tasks[int(env["SLURM_PROCID"])] = (env.get("SLURM_NODEID"), env.get("SLURMD_NODENAME"), host.stdout.strip())
    return tasks


@pytest.fixture(scope="module")
def one_node(two_nodes):
    """The reference: the same 2-process job as 2 tasks on one node of the same cluster."""
    tmp, shards = two_nodes
    job_id, run_dir = train_on_slurm(tmp / "one", shards, "launcher.nodes=1")
    return job_id, run_dir, wait_done(job_id, run_dir)


@pytest.fixture(scope="module")
def two_node_job(two_nodes):
    tmp, shards = two_nodes
    job_id, run_dir = make_train_slurm(tmp / "two", shards)
    wait_training(job_id, run_dir)
    tasks = training_tasks(job_id)
    return job_id, run_dir, wait_done(job_id, run_dir), tasks


def mlflow_runs(tmp: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "sgexp"]
    return client, client.search_runs([experiment.experiment_id])


def test_two_node_ddp_job_equals_the_one_node_job(two_nodes, two_node_job, one_node):
    tmp, _ = two_nodes
    job_id, run_dir, text, tasks = two_node_job
    assert tasks == {0: ("0", NODES[0], NODES[0]), 1: ("1", NODES[1], NODES[1])}, tasks  # node ranks 0 and 1
    assert f"job {job_id} on sg-node[1-2]" in text and "rendezvous sg-node1:" in text, text[-4000:]
    assert "cluster environment: SLURMEnvironment, world size 2, global rank 0" in text, text[-4000:]
    assert "global rank 1" in text and "distributed_backend=gloo" in text
    script = (run_dir / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script

    assert sorted((tmp / "two" / "runs").rglob("last.ckpt")) == [run_dir / "checkpoints" / "last.ckpt"]
    client, [run] = mlflow_runs(tmp / "two")  # one run directory, one MLflow run
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text().strip() and run.info.status == "FINISHED"
    assert run.data.tags["sgexp.world_size"] == "2" and run.data.params["trainer.num_nodes"] == "2"
    assert run.data.params["trainer.devices"] == "1"

    ref_run_dir = one_node[1]
    assert "#SBATCH --nodes=1" in (ref_run_dir / "slurm" / "train.sbatch").read_text()
    assert weights(run_dir / "checkpoints" / "last.ckpt")[0] == weights(ref_run_dir / "checkpoints" / "last.ckpt")[0]
    assert differing_tensors(run_dir / "checkpoints" / "last.ckpt", ref_run_dir / "checkpoints" / "last.ckpt") == []


def interrupt_two_node_job(tmp: Path, shards: Path, how: list[str]) -> tuple[str, Path, str, str]:
    """A running 2-node job, interrupted by ``how`` + its job id; returns (job id, run dir, log, MLflow run id)."""
    job_id, run_dir = make_train_slurm(tmp, shards)
    wait_training(job_id, run_dir)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    subprocess.run([*how, job_id], check=True)
    text = wait_done(job_id, run_dir)
    assert text.count(f"job {job_id} on sg-node[1-2]") == 2, text[-4000:]  # ran again on both nodes
    assert "restart 1" in text
    return job_id, run_dir, text, run_id


def assert_resumed_like(run_dir: Path, reference: Path, tmp: Path, run_id: str, interrupted_at: int) -> None:
    """Same final step and weights as the uninterrupted job, one MLflow run spanning the interruption."""
    ckpt, ref = run_dir / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt"
    assert weights(ckpt)[0] == weights(ref)[0] == STEPS
    assert differing_tensors(ckpt, ref) == [], "the resumed 2-node run diverged from the uninterrupted one"
    client, [run] = mlflow_runs(tmp)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert run.data.tags["sgexp.slurm_restart_count"] == "1"
    history = [m.step for m in client.get_metric_history(run_id, "train/images_per_s")]
    assert min(history) < interrupted_at < max(history) <= STEPS


def test_two_node_usr1_checkpoints_requeues_and_resumes(two_nodes, two_node_job):
    tmp, shards = two_nodes
    job_id, run_dir, text, run_id = interrupt_two_node_job(tmp / "usr1", shards, ["scancel", "--signal=USR1"])
    assert "SIGUSR1: saving" in text and f"requeued SLURM job {job_id}" in text, text[-4000:]
    assert "stopped by SIGUSR1 at step" in text  # it stops once requeued, instead of training on until killed
    interrupted_at, _ = weights(run_dir / "hpc_ckpt_1.ckpt")
    assert 0 < interrupted_at < STEPS and "resuming from hpc" in text
    assert_resumed_like(run_dir, two_node_job[1], tmp / "usr1", run_id, interrupted_at)


def test_two_node_plain_scontrol_requeue_resumes(two_nodes, two_node_job):
    """No signal first: SLURM ends both nodes' tasks with SIGTERM; they save last.ckpt and exit."""
    tmp, shards = two_nodes
    _, run_dir, text, run_id = interrupt_two_node_job(tmp / "requeue", shards, ["scontrol", "requeue"])
    resumed = re.search(r"resuming from (\S+), step (\d+)", text)
    assert resumed and 0 < int(resumed.group(2)) < STEPS, text[-4000:]  # not a restart at step 0
    assert not list(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert_resumed_like(run_dir, two_node_job[1], tmp / "requeue", run_id, int(resumed.group(2)))


def sweep_on_both_nodes(two_nodes, two_node_job, name: str, **stores: str) -> Sweep:
    """``--slurm-array 2`` with a whole node per task (``--slurm-cpus 2``): one worker on each node, one study,
    one ``mlflow server`` (``stores``: see ``sweep_array``); no setting evaluated twice, the report written."""
    tmp, shards = two_nodes
    checkpoint = two_node_job[1] / "checkpoints" / "last.ckpt"
    sweep = sweep_array(tmp / name, shards, checkpoint, "--slurm-cpus", "2", **stores)
    assert sorted({w.split(":")[0] for w in sweep.workers}) == NODES, sweep.workers
    return sweep


def test_two_node_sweep_array_runs_on_both_nodes(two_nodes, two_node_job):
    """The study in an Optuna journal on the shared filesystem, the MLflow server's runs in sqlite."""
    sweep_on_both_nodes(two_nodes, two_node_job, "sweep")


def test_two_node_sweep_array_on_postgresql(two_nodes, two_node_job):
    """What a large cluster uses: one PostgreSQL server as the Optuna storage and as the MLflow server's backend
    store (two databases), started here on 127.0.0.1 and stopped after. The URLs carry no password: libpq reads
    ``PGPASSWORD`` (inherited by the jobs; ``~/.pgpass`` on a real cluster), so none is in the sbatch script or
    in MLflow. The trials and the runs are read back from PostgreSQL's own tables."""
    tmp, _ = two_nodes
    with postgres_server(tmp / "postgres", databases=("optuna", "mlflow")) as pg, pytest.MonkeyPatch.context() as env:
        env.setenv("PGPASSWORD", pg.password)
        stores = {"storage": pg.url("optuna", password=False), "mlflow_backend": pg.url("mlflow", password=False)}
        sweep = sweep_on_both_nodes(two_nodes, two_node_job, "sweep_pg", **stores)

        trials = "SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = :name AND state = :state"
        children = "SELECT count(*) FROM tags WHERE key = 'mlflow.parentRunId' AND value = :parent"
        with sql(pg.url("optuna")) as optuna_db, sql(pg.url("mlflow")) as mlflow_db:
            assert (
                optuna_db.execute(sqlalchemy.text(trials), {"name": "sparsity_pareto", "state": "COMPLETE"}).scalar()
                == sweep.trials
            )
            assert (
                mlflow_db.execute(sqlalchemy.text(children), {"parent": sweep.parent_run_id}).scalar() == sweep.trials
            )
            params = mlflow_db.execute(sqlalchemy.text("SELECT value FROM params")).scalars().all()
        script = (tmp / "sweep_pg" / "runs/sweeps/sparsity_pareto/slurm/workers.sbatch").read_text()
        assert pg.url("optuna", password=False) in script and not [v for v in params if pg.password in v]
        assert pg.password not in script


@contextlib.contextmanager
def sql(url: str):
    """A SQLAlchemy connection to ``url``, its engine disposed after (no connection left for the server's stop)."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            yield connection
    finally:
        engine.dispose()


def node_processes(node: str) -> list[int]:
    """The processes of ``node``: its slurmd and everything it started (job steps, training tasks, loader
    workers) live in the node's own mount namespace, recorded by two_node_slurm.sh at start."""
    ns = (TWO_NODE_CONF.parent.parent / "run" / f"{node}.ns").read_text().strip()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "ns" / "mnt") == ns:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_two_node_lost_node_requeues_and_resumes(two_nodes, two_node_job):
    """sg-node2 is lost mid-job: its slurmd and tasks freeze (SIGSTOP), as when a machine hangs or loses
    power: no process exits and no connection is closed, the controller just stops hearing from it. SLURM
    marks it DOWN after SlurmdTimeout (30 s here, 300 s by default), ends the job on sg-node1 and, as the
    job has ``--requeue``, queues it again; it waits for 2 nodes. The node comes back (its processes are
    killed, slurmd restarts): the job runs again on both nodes, resumes from the newest ``last.ckpt`` and
    ends like the uninterrupted job, in the same MLflow run, with the earlier metric history kept."""
    tmp, shards = two_nodes
    job_id, run_dir = make_train_slurm(tmp / "lost", shards)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not last.is_file():  # something to lose: the first periodic checkpoint (step 50)
        assert time.monotonic() < deadline, job_log(run_dir, job_id)[-4000:]
        time.sleep(0.5)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    frozen = node_processes(NODES[1])
    assert frozen, "no processes in sg-node2's namespace"
    t0 = time.monotonic()
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        while (
            "JobState=RUNNING"
            in subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        ):
            assert time.monotonic() - t0 < 120, "SLURM did not notice the lost node"
            time.sleep(1)
        noticed = time.monotonic() - t0
    finally:  # bring the node back: a fresh slurmd (the frozen one and its tasks are gone for good)
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        started = subprocess.run(
            [str(ROOT / "scripts/slurm/two_node_slurm.sh"), "start"], capture_output=True, text=True
        )
        assert started.returncode == 0, started.stderr[-3000:]
    back = time.monotonic() - t0
    text = wait_done(job_id, run_dir)
    done = time.monotonic() - t0
    print(f"lost node: requeued after {noticed:.0f} s, node back after {back:.0f} s, job done after {done:.0f} s")

    assert "DUE TO NODE FAILURE" in text and text.count(f"job {job_id} on sg-node[1-2]") == 2, text[-4000:]
    resumed = re.search(r"resuming from last\.ckpt, step (\d+)", text)
    assert resumed and int(resumed.group(1)) >= 50, text[-4000:]
    assert_resumed_like(run_dir, two_node_job[1], tmp / "lost", run_id, int(resumed.group(1)))
