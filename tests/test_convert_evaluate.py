"""Converted official checkpoints in the rest of sgexp: ``python -m sgexp.convert`` then
``sgexp.evaluate`` on a TREAD network (8x8x4 latents, 10 classes) scored on a toy latent dataset
of the same shape; evaluation refusing DiT's ε-prediction network; and a fine-tune started from
a converted SiT or DiT checkpoint keeping the imported conventions (``sgexp.lit.checkpointing``).

Uses the official-code fixtures of ``test_upstream`` (skipped without them) and the tiny random
VAE of ``latent_toy``; scored with the image dataset's small classifier, as the fast tests of
``test_latent_pipeline`` are (an Inception Fréchet distance takes minutes on 2 busy cores)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from latent_toy import save_tiny_vae, toy_image_dataset
from test_upstream import ATOL, FIXTURES, HEADS, fixture, max_diff, upstream_files

from sgexp import runs
from sgexp.convert import convert
from sgexp.convert import main as convert_main
from sgexp.data import read_meta
from sgexp.data.latents import prepare_latents
from sgexp.eval import train_classifier
from sgexp.evaluate import run as evaluate
from sgexp.lit.checkpointing import CONVENTIONS, finetune_network, load_initial_weights
from sgexp.lit.module import FlowMatchingModule
from sgexp.models import DiTConfig

pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"upstream fixtures not found at {FIXTURES} (set SGEXP_UPSTREAM_FIXTURES)"
)
CLASSES = 10  # every fixture's num_classes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Each kind's official checkpoint file (as ``test_upstream`` writes them)."""
    tmp = tmp_path_factory.mktemp("upstream")
    return dict(upstream_files(tmp))


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory) -> dict[str, Path]:
    """The DiT and SiT files converted (dense, no dataset): what a fine-tune would start from."""
    tmp = tmp_path_factory.mktemp("converted")
    return {
        kind: convert(kind, files[kind], tmp / kind / "checkpoints" / "last.ckpt", num_heads=HEADS)
        for kind in ("dit", "sit")
    }


@pytest.fixture(scope="module")
def toy_latents(tmp_path_factory) -> tuple[Path, Path]:
    """(shards root, its ``toy_latents``): 60 random 32px images in 10 classes, encoded to 4x8x8 by the
    tiny VAE; the image dataset's classifier (which the latents borrow) trained 1 epoch."""
    tmp = tmp_path_factory.mktemp("toy")
    images = toy_image_dataset(tmp, classes=CLASSES)
    vae = save_tiny_vae(tmp / "vae")
    latents = prepare_latents(images, str(vae), batch_size=16, flip=False, device="cpu", workers=1)
    train_classifier(images, epochs=1, batch_size=16)
    return images.parent, latents


def test_convert_then_evaluate_a_tread_checkpoint(files, toy_latents, tmp_path):
    shards, latents = toy_latents
    meta = read_meta(latents)
    assert (meta["format"], meta["num_classes"], meta["channels"], meta["resolution"]) == ("latent", CLASSES, 4, 8)
    ckpt = tmp_path / "runs" / "tread" / "checkpoints" / "last.ckpt"
    argv = [
        "--from",
        "tread",
        "--checkpoint",
        str(files["tread"]),
        "--out",
        str(ckpt),
        "--num-heads",
        str(HEADS),
        "--routes",
        "1:2@0.5",
        "--dataset",
        latents.name,
        "--data-dir",
        str(shards),
    ]
    assert convert_main(argv) == ckpt and ckpt.is_file()  # the shape check against meta.json passed

    overrides = [
        f"checkpoint={ckpt}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"out_dir={tmp_path / 'eval'}",
        "logger.enabled=false",
        "guidance=[none,cfg,sg]",
        "extractor=classifier",
        "reference_split=train",
        "num_samples=10",
        "batch_size=10",
        "sampler.steps=2",
        "grid_size=10",
        "device=cpu",
    ]
    results = evaluate(compose_config("evaluate", overrides))
    written = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert written["step"] == results["step"] == 0 and written["checkpoint"] == str(ckpt.resolve())
    assert (written["dataset"], written["reference"]) == ("toy_latents", "toy_latents/train")
    rows = {row["setting"]: row for row in written["rows"]}
    assert set(rows) == {"none", "cfg", "sg"}
    for name, row in rows.items():
        assert row["num_samples"] == 10, name
        for key in ("fid", "precision", "recall", "class_accuracy", "gflops_per_sample"):
            assert math.isfinite(row[key]), (name, key, row[key])
    # SG's passes route half (γ 0.5) and 90% of the tokens of blocks 1..2: cheaper than CFG's two dense passes
    assert rows["sg"]["gflops_per_sample"] < rows["cfg"]["gflops_per_sample"]


def test_evaluate_refuses_an_epsilon_prediction_checkpoint(converted, tmp_path):
    ckpt = converted["dit"]
    overrides = [
        f"checkpoint={ckpt}",
        f"paths.root={ROOT}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"out_dir={tmp_path / 'eval'}",
        "logger.enabled=false",
        "device=cpu",
    ]
    with pytest.raises(ValueError, match="epsilon-prediction network") as err:
        evaluate(compose_config("evaluate", overrides))
    message = str(err.value)
    assert str(ckpt.resolve()) in message and "fine-tune it first" in message and "init_from=" in message
    assert not (tmp_path / "eval").exists()  # refused before any output


def default_conventions(config: DiTConfig) -> DiTConfig:
    """The same network as an experiment config would describe it: sgexp's own conventions."""
    return dataclasses.replace(
        config, time_scale=1000.0, time_reversed=False, output_sign=1, pos_embed="sincos", prediction="velocity"
    )


@torch.no_grad()
def test_finetune_from_converted_checkpoints_keeps_their_conventions(converted):
    for kind, prediction in (("sit", "velocity"), ("dit", "epsilon")):
        held = held_config(converted[kind])
        assert held.prediction == prediction and held.pos_embed == "stored"
        network = default_conventions(held)
        assert any(getattr(network, k) != getattr(held, k) for k in CONVENTIONS)  # the test is not vacuous
        tuned = finetune_network(network, converted[kind])
        assert {k: getattr(tuned, k) for k in CONVENTIONS} == {k: getattr(held, k) for k in CONVENTIONS}, kind
        assert tuned.prediction == "velocity", kind
        assert dataclasses.replace(tuned, **{k: getattr(network, k) for k in CONVENTIONS}) == network

    tuned = finetune_network(default_conventions(held_config(converted["sit"])), converted["sit"])
    module = FlowMatchingModule(model=tuned.to_dict())
    assert load_initial_weights(module, converted["sit"])["prediction"] == "velocity"
    f = fixture("sit")
    # SiT: t = 0 is noise, u = x_data − noise; sgexp: t = 1 is noise, v = ε − x₀.
    for net in (module.ema.model.eval(), module.model.eval()):
        assert max_diff(net(f["x"], 1 - f["t"], f["y"]), -f["out"]) < ATOL

    # DiT's ε network starts a velocity fine-tune: the weights load and keep DiT's t/1000 input.
    tuned = finetune_network(default_conventions(held_config(converted["dit"])), converted["dit"])
    module = FlowMatchingModule(model=tuned.to_dict())
    assert load_initial_weights(module, converted["dit"])["prediction"] == "epsilon"
    assert module.config.prediction == "velocity"
    f = fixture("dit")
    assert max_diff(module.ema.model.eval()(f["x"], f["t"] / 1000, f["y"]), f["out"][:, :4]) < ATOL


def held_config(ckpt: Path) -> DiTConfig:
    return DiTConfig.from_dict(runs.open_checkpoint(ckpt)["hyper_parameters"]["model"])
