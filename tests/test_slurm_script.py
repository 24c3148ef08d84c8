"""The sbatch scripts sgexp writes, and the SLURM run directory, without a cluster (see test_slurm.py for one)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

from sgexp import slurm
from sgexp.runs import resolve_paths


def test_paper_job_script_four_nodes_of_eight_gpus(tmp_path):
    """What a real GPU cluster gets for 4 nodes x 8 GPUs: 32 tasks under one srun, rendezvous on the first
    node, the user's setup lines (modules, conda, NCCL) before srun, and the script is valid bash."""
    setup = ["module load cuda/12.4", "source ~/miniforge3/bin/activate sgexp", "export NCCL_SOCKET_IFNAME=ib0"]
    cfg = compose_train(
        ["experiment=imagenet256_sit_xl2_tread", "launcher=slurm", "launcher.nodes=4", f"launcher.setup={setup}"]
    )
    spec = slurm.training_spec(OmegaConf.to_object(cfg.launcher), "sgexp-x")
    spec = replace(spec, extra=["--constraint=h100", "#SBATCH --exclusive"])
    command = ["python", "-m", "sgexp.train", "a=b c"]
    text = slurm.render(spec, command, workdir=tmp_path, setup=cfg.launcher.setup)
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=sgexp-x",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
    ]
    lines = text.splitlines()
    assert lines[-1] == "srun --kill-on-bad-exit=1 python -m sgexp.train 'a=b c'"
    assert lines[-1 - len(setup) : -1] == setup  # the user's lines, in order, right before srun
    master = next(i for i, line in enumerate(lines) if line.startswith("export MASTER_ADDR="))
    assert lines[master + 1] == "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))"
    assert master < lines.index(setup[0])  # the setup lines may override the rendezvous
    assert any("NCCL" in line and line.startswith("#") for line in lines[master:])  # left to the user, said so
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_master_address_is_the_first_node_of_the_allocation(tmp_path):
    """The script's rendezvous lines, run by bash with SLURM's variables (a real ``scontrol`` expands the
    node list; it only needs a config naming a cluster): the first node and a port from the job id."""
    spec = slurm.SbatchSpec(job_name="x", nodes=4, tasks_per_node=8, gpus_per_node=8)
    lines = slurm.render(spec, ["true"], workdir=tmp_path).splitlines()
    rendezvous = [line for line in lines if line.startswith("export MASTER_")]
    if shutil.which("scontrol") is None:
        pytest.skip("no scontrol to expand the node list")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\n")
    env = {
        **os.environ,
        "SLURM_CONF": str(conf),
        "SLURM_JOB_NODELIST": "gpu[017-018,120],gpu200",
        "SLURM_JOB_ID": "123456",
    }
    shown = subprocess.run(
        ["bash", "-c", "\n".join([*rendezvous, 'echo "$MASTER_ADDR $MASTER_PORT"'])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert shown.stdout.split() == ["gpu017", str(10000 + 123456 % 20000)]


def test_sweep_worker_scripts_have_no_rendezvous(tmp_path):
    """Array tasks are independent single processes: no srun, no MASTER_ADDR."""
    text = slurm.render(slurm.SbatchSpec(job_name="x", array="0-3"), ["python", "w.py"], workdir=tmp_path, srun=False)
    assert "MASTER_ADDR" not in text and text.splitlines()[-1] == "python w.py"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(nodes=0), "launcher.nodes=0 is invalid"),
        (dict(gpus_per_node=8, tasks_per_node=4), "launcher.tasks_per_node=4 is invalid: must equal"),
        (dict(time="two days"), "launcher.time='two days' is invalid"),
        (dict(signal_seconds=-5), "launcher.signal_seconds=-5 is invalid"),
    ],
)
def test_bad_job_specs_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slurm.SbatchSpec(job_name="x", **kwargs)


def test_run_directory_inside_a_job_is_stable(tmp_path, monkeypatch):
    """All ranks and every requeue of one job agree on the run directory: no timestamp in it."""
    cfg = compose_train([f"paths.runs_dir={tmp_path}"])
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert resolve_paths(cfg)[0] == tmp_path / "mnist_tread" / "slurm-41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert resolve_paths(cfg)[0] == tmp_path / "mnist_tread" / "slurm-40_3"
    cfg.paths.run_dir = str(tmp_path / "fixed")  # what a submission by sgexp passes
    assert resolve_paths(cfg)[0] == Path(tmp_path / "fixed")


def test_submission_without_sbatch_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ValueError, match="launcher='slurm' is invalid: needs `sbatch` on PATH"):
        slurm.require_sbatch()
