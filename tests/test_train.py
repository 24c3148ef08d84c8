"""Training end to end through Hydra's compose API, on real shards, with real MLflow (sqlite)."""

from __future__ import annotations

import io
import math
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning
import pytest
import torch
from conftest import compose_train, digits_run
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient

from sgexp.config import OptimConfig
from sgexp.lit.module import FlowMatchingModule, NonFiniteLossError
from sgexp.models.dit import DiTConfig
from sgexp.train import run


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_smoke_train_logs_to_mlflow(tmp_path, shards, monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)  # trainer.progress=rich draws its bar on a terminal only
    cfg = compose_train(digits_run(tmp_path, shards, "trainer.progress=rich"))
    result = run(cfg)
    assert "━" in screen.getvalue()
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
    images = [a.path for a in client.list_artifacts(result.mlflow_run_id, "images")]
    for setting in ("none", "cfg", "sg"):  # each grid an MLflow image at its step (sgexp.run_record.log_image)
        assert any(f"{setting}~samples+step+8+" in p and p.endswith(".png") for p in images), images

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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "optim.lr=0.0 is invalid"),
        (dict(betas=[0.9]), "optim.betas=.* is invalid"),
        (dict(betas=[0.9, 1.0]), "optim.betas=.* is invalid"),
        (dict(warmup_steps=-1), "optim.warmup_steps=-1 is invalid"),
        (dict(ema_decay=1.0), "optim.ema_decay=1.0 is invalid"),
    ],
)
def test_bad_optimizer_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_a_bad_optimizer_setting_fails_before_training(tmp_path, shards):
    cfg = compose_train(digits_run(tmp_path, shards, "optim.lr=0", f"paths.run_dir={tmp_path / 'x'}"))
    with pytest.raises(ValueError, match="optim.lr=0.0 is invalid"):
        run(cfg)
    assert not (tmp_path / "x").exists()


def test_optim_config_makes_adamw_with_a_linear_warmup():
    optim = OptimConfig(lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1, warmup_steps=4)
    made = optim.make_optimizer([torch.nn.Parameter(torch.zeros(2))])
    optimizer, schedule = made["optimizer"], made["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and made["lr_scheduler"]["interval"] == "step"
    assert optimizer.defaults["betas"] == (0.8, 0.99) and optimizer.defaults["weight_decay"] == 0.1
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_checkpoints_load_with_plain_hparams_and_old_flat_optimizer_keys(tmp_path):
    network = DiTConfig.from_name("SiT-Micro/2", input_size=8, in_channels=1, num_classes=10).to_dict()
    optim = OptimConfig(lr=1e-3, betas=[0.9, 0.99], warmup_steps=5, ema_decay=0.99, ema_warmup=False)
    module = FlowMatchingModule(network, optim, seed=3, dataset="digits")
    assert module.hparams.model == network and module.hparams.dataset == "digits"
    assert module.hparams.optim == asdict(optim) and FlowMatchingModule(network, asdict(optim)).optim == optim
    state = {
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
    }
    torch.save(state, tmp_path / "new.ckpt")
    # plain data only: torch's weights_only unpickler reads it
    loaded = FlowMatchingModule.load_from_checkpoint(tmp_path / "new.ckpt", map_location="cpu", weights_only=True)
    assert loaded.optim == optim and loaded.hparams.seed == 3 and loaded.hparams.dataset == "digits"

    # written before the optimizer settings were grouped under `optim`
    flat = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.0, "warmup_steps": 5, "ema_decay": 0.99}
    flat |= {"ema_warmup": False, "t_mean": 0.0, "t_std": 1.0, "compile": False}
    old = {**state, "hyper_parameters": {"model": network, **flat, "seed": 3, "dataset": "digits"}}
    torch.save(old, tmp_path / "old.ckpt")
    loaded = FlowMatchingModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert loaded.optim == optim and loaded.ema.decay == 0.99 and not loaded.ema.warmup
    assert loaded.hparams.optim == asdict(optim) and "lr" not in loaded.hparams and loaded.hparams.seed == 3
    weights = loaded.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())
    with pytest.raises(TypeError, match="lrr"):
        FlowMatchingModule(network, lrr=1e-3)
    with pytest.raises(TypeError, match="give optim"):
        FlowMatchingModule(network, optim, lr=1e-3)
