"""Training end to end through Hydra's compose API, on real shards, with real MLflow (sqlite)."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import compose_train, digits_run
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from sgexp.lit.module import FlowMatchingModule, NonFiniteLossError
from sgexp.train import run


def test_smoke_train_logs_to_mlflow(tmp_path, shards):
    cfg = compose_train(digits_run(tmp_path, shards, "trainer.progress=rich"))
    result = run(cfg)
    assert result.global_step == 8
    assert result.checkpoint.is_file()
    assert (result.run_dir / "checkpoints" / "step-0000004.ckpt").is_file()
    assert (result.run_dir / "config.yaml").is_file()
    assert len(result.sample_grids) == 3 and all(p.is_file() for p in result.sample_grids)
    # mnist_tread (the base of these runs) trains the dataset's classifier: domain FID at the end.
    assert all(math.isfinite(r["fid"]) and r["gflops_per_sample"] > 0 for r in result.evaluations)
    assert result.evaluations[0]["metric"] == "domain FID (digits classifier)"

    client = MlflowClient(result.tracking_uri)
    mlrun = client.get_run(result.mlflow_run_id)
    metrics = mlrun.data.metrics
    for key in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/images_per_s",
        "val/loss",
        "eval/sg/relative_to_cfg",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert any(k.startswith("train/tokens_per_s/blocks_1-2") for k in metrics)
    # Route 1..2 of 4 blocks at γ=0.5 skips half the tokens in half the blocks.
    assert metrics["train/block_flops_saved"] == pytest.approx(0.25)
    assert mlrun.data.params["model.name"] == "SiT-Micro/2"
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert "config.yaml" in artifacts
    samples = client.list_artifacts(result.mlflow_run_id, "samples")
    assert len(samples) == 3

    module = FlowMatchingModule.load_from_checkpoint(result.checkpoint, map_location="cpu")
    assert module.config.routes[0].start == 1 and module.config.input_size == 8
    assert int(module.ema.num_updates) == 8


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, shards):
    straight = run(compose_train(digits_run(tmp_path, shards, f"paths.run_dir={tmp_path / 'straight'}")))
    first = run(
        compose_train(digits_run(tmp_path, shards, f"paths.run_dir={tmp_path / 'split'}", "trainer.max_steps=5"))
    )
    assert first.global_step == 5
    resumed = run(compose_train(digits_run(tmp_path, shards, f"resume={tmp_path / 'split'}")))
    assert resumed.global_step == 8
    assert resumed.run_dir == first.run_dir
    assert resumed.mlflow_run_id == first.mlflow_run_id  # the same MLflow run continues

    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # And training really changed the weights (the comparison is not vacuous).
    start = _weights(first.run_dir / "checkpoints" / "step-0000004.ckpt")
    assert not torch.equal(start["model.blocks.0.attn.qkv.weight"], a["model.blocks.0.attn.qkv.weight"])


def test_non_finite_loss_stops_and_keeps_a_good_checkpoint(tmp_path, shards):
    cfg = compose_train(
        digits_run(
            tmp_path,
            shards,
            "optim.lr=1e12",
            "optim.warmup_steps=0",
            "trainer.max_steps=50",
            "callbacks.checkpoint.last_every_n_steps=1",
            f"paths.run_dir={tmp_path / 'diverge'}",
        )
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* at step \d+"):
        run(cfg)
    last = tmp_path / "diverge" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert all(torch.isfinite(v).all() for v in _weights(last).values() if v.is_floating_point())


@pytest.mark.parametrize(
    "override,match",
    [("optim.lrr=1", "lrr"), ("trainer.max_steps=many", "max_steps"), ("data.batchsize=3", "batchsize")],
)
def test_config_typo_fails_at_compose_naming_the_key(override, match):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([override])
    assert match in str(err.value) + str(err.value.__cause__)


def test_unreachable_tracking_server_fails_before_training(tmp_path, shards):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    cfg = compose_train(digits_run(tmp_path, shards, f"logger.tracking_uri={uri}", f"paths.run_dir={tmp_path / 'x'}"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=uri):
        run(cfg)
    assert time.perf_counter() - start < 15
    assert not (tmp_path / "x").exists()


def test_experiments_compose():
    for name in ("mnist_tread", "mnist_dense", "imagenet256_sit_b2_tread", "imagenet256_sit_xl2_tread"):
        cfg = compose_train([f"experiment={name}"])
        assert cfg.experiment == name
    finetunes = ("mnist_tread_finetune", "mnist_dense_finetune", "imagenet256_sit_xl2_tread_finetune")
    for name in (*finetunes, "imagenet256_dense_finetune"):
        cfg = compose_train([f"experiment={name}", "init_from=x.ckpt"])
        assert cfg.experiment == name and cfg.init_from == "x.ckpt"
    assert list(compose_train(["experiment=imagenet256_dense_finetune", "init_from=x"]).routing.spans) == []
    assert compose_train(["experiment=imagenet256_dense_finetune", "init_from=x"]).optim.lr == 1e-5
    assert not compose_train(["experiment=imagenet256_sit_xl2_tread"]).optim.ema_warmup
    xl = compose_train(["experiment=imagenet256_sit_xl2_tread"])
    assert xl.model.name == "SiT-XL/2" and list(xl.routing.spans) == ["2:24"] and xl.optim.lr == 1e-4
    assert xl.optim.ema_decay == 0.9999 and xl.trainer.precision == "bf16-mixed"
    assert list(compose_train(["experiment=mnist_dense"]).routing.spans) == []
