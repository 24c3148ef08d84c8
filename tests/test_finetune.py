"""``init_from=``: a new run from another run's weights (fine-tuning), on real shards with real MLflow."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_train, digits_run
from mlflow.tracking import MlflowClient

from sgexp.lit.checkpointing import load_initial_weights
from sgexp.lit.module import FlowMatchingModule
from sgexp.train import run


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.rglob("*.ckpt")
    }


@pytest.fixture(scope="module")
def dense(tmp_path_factory, shards):
    """A short dense run: the source of every fine-tune below."""
    tmp = tmp_path_factory.mktemp("dense")
    return run(compose_train(digits_run(tmp, shards, "routing=none", f"paths.run_dir={tmp / 'dense'}")))


def test_the_first_weights_are_the_sources_ema_and_routing_may_differ(dense):
    source = torch.load(dense.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    routed = FlowMatchingModule.load_from_checkpoint(dense.checkpoint, map_location="cpu")
    config = routed.config.to_dict()
    tread = FlowMatchingModule({**config, "routes": [{"start": 1, "end": 2, "sparsity": 0.5}]})  # fresh weights
    load_initial_weights(tread, dense.checkpoint, "ema")
    for key, value in tread.model.state_dict().items():
        assert torch.equal(value, source[f"ema.model.{key}"]), key
        assert torch.equal(tread.ema.model.state_dict()[key], value), key
    assert int(tread.ema.num_updates) == 0
    assert not torch.equal(source["ema.model.blocks.0.attn.qkv.weight"], source["model.blocks.0.attn.qkv.weight"])
    load_initial_weights(tread, dense.checkpoint, "model")
    assert torch.equal(tread.model.blocks[0].attn.qkv.weight, source["model.blocks.0.attn.qkv.weight"])


def test_another_network_is_refused_naming_the_field(dense):
    config = FlowMatchingModule.load_from_checkpoint(dense.checkpoint, map_location="cpu").config.to_dict()
    wider = FlowMatchingModule({**config, "hidden_size": config["hidden_size"] * 2})
    with pytest.raises(ValueError, match=r"init_from=.* is invalid: another network \(hidden_size: checkpoint"):
        load_initial_weights(wider, dense.checkpoint)
    with pytest.raises(ValueError, match=r"init_from_weights='last' is invalid"):
        load_initial_weights(wider, dense.checkpoint, "last")


def test_dense_to_tread_finetune_end_to_end_as_make_train_runs_it(tmp_path, shards, dense):
    """``make train EXP=mnist_tread_finetune ARGS="init_from=..."`` (here on the digits shards): a new run
    directory and MLflow run tagged with the source, a fresh optimizer, the source untouched."""
    before = _digest(dense.run_dir)
    overrides = digits_run(tmp_path, shards, f"init_from={dense.run_dir}", f"paths.run_dir={tmp_path / 'ft'}")
    command = [sys.executable, "-m", "sgexp.train", "experiment=mnist_tread_finetune", *overrides]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(dense.run_dir) == before  # the source run is untouched

    state = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 8  # counted from 0, not from the source's step
    adam = state["optimizer_states"][0]["state"]
    assert all(int(s["step"]) == 8 for s in adam.values())  # a fresh optimizer: 8 updates, not 16
    assert state["hyper_parameters"]["model"]["routes"] == [{"start": 1, "end": 2, "sparsity": 0.5}]
    run_id = (tmp_path / "ft" / "mlflow_run_id").read_text().strip()
    assert run_id != dense.mlflow_run_id
    tags = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags
    assert tags["sgexp.init_from"] == str(dense.checkpoint) and tags["sgexp.init_from_weights"] == "ema"


def test_init_from_with_resume_or_a_missing_source_fails_before_any_work(tmp_path, shards, dense):
    with pytest.raises(ValueError, match=r"init_from=.* is invalid: starts a new run; resume= continues one"):
        run(compose_train(digits_run(tmp_path, shards, f"init_from={dense.checkpoint}", f"resume={dense.run_dir}")))
    with pytest.raises(ValueError, match=r"init_from='nowhere.ckpt' is invalid: no checkpoint file"):
        run(compose_train(digits_run(tmp_path, shards, "init_from=nowhere.ckpt")))
