"""The sbatch scripts sgexp writes, and the SLURM run directory, without a cluster (see test_slurm.py for one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf

from sgexp import slurm
from sgexp.runs import resolve_paths


def test_paper_job_script_four_nodes_of_eight_gpus(tmp_path):
    cfg = compose_train(["experiment=imagenet256_sit_xl2_tread", "launcher=slurm", "launcher.nodes=4"])
    spec = slurm.training_spec(OmegaConf.to_object(cfg.launcher), "sgexp-x")
    spec = replace(spec, extra=["--constraint=h100", "#SBATCH --exclusive"])
    text = slurm.render(spec, ["python", "-m", "sgexp.train", "a=b c"], workdir=tmp_path, setup=["module load cuda"])
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
    assert lines.index("module load cuda") < len(lines) - 1
    assert lines[-1] == "srun --kill-on-bad-exit=1 python -m sgexp.train 'a=b c'"


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
