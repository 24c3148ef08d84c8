"""Latent diffusion end to end: image shards -> ``prepare latents`` -> training on latents (from
meta.json alone) -> sampling -> SD-VAE decoding -> features -> FID against the image dataset's
train split or an ADM reference batch. A tiny random AutoencoderKL stands in for sd-vae-ft-ema
and a random TorchScript module for clean-fid's Inception (neither is available offline).

The fast tests score with the image dataset's own small classifier (128-d features): a Fréchet
distance in Inception's 2048 dimensions takes scipy's sqrtm minutes on 2 busy cores. The
Inception path is checked up to its features here, and end to end by the slow test."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, compose_train
from latent_toy import save_tiny_vae, toy_image_dataset
from PIL import Image
from test_eval_metrics import StandInInception

from sgexp.data import read_meta
from sgexp.data.latents import prepare_latents
from sgexp.diffusion import Sampler, sparse_guidance
from sgexp.eval import build_extractor, load_reference_batch, stats_path, train_classifier
from sgexp.eval.evaluator import load_ema, load_evaluator
from sgexp.eval.sampling import Setting, sample_and_extract
from sgexp.evaluate import run as evaluate
from sgexp.train import run as train
from sgexp.vae import vae_for_dataset

GRID = (3 * 33 + 1, 2 * 33 + 1)  # 6 decoded 32px images, one column per class, 1px padding


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(tmp, shards root, image dataset, VAE dir, Inception stand-in, train result):
    SiT-Micro/2 trained 4 steps on 4x8x8 latents, scored by the image dataset's classifier."""
    tmp = tmp_path_factory.mktemp("latent_pipeline")
    images = toy_image_dataset(tmp)
    vae = save_tiny_vae(tmp / "vae")
    prepare_latents(images, str(vae), batch_size=8, flip=True, device="cpu", workers=1)
    train_classifier(images, epochs=2, batch_size=8)  # the images' classifier; latent datasets borrow it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        weights = tmp / "stand-in-inception.pt"
        torch.jit.script(StandInInception()).save(str(weights))
    overrides = [
        "data=imagenet256_latents",  # the paper's data config, pointed at the toy latents
        "data.name=toy_latents",
        f"data.root={images.parent}",
        "data.global_batch_size=8",
        "data.num_workers=0",
        "model.name=SiT-Micro/2",
        f"paths.root={ROOT}",
        f"paths.runs_dir={tmp / 'runs'}",
        "logger.enabled=false",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "trainer.max_steps=4",
        "trainer.max_time=null",
        "trainer.val_every_n_steps=2",
        "trainer.log_every_n_steps=2",
        "trainer.progress=none",
        "callbacks.checkpoint.every_n_steps=4",
        "callbacks.checkpoint.last_every_n_steps=2",
        "callbacks.guided_eval.extractor=classifier",
        "callbacks.guided_eval.train_classifier=false",  # trained above, on the images
        "callbacks.guided_eval.reference_split=train",
        "callbacks.guided_eval.num_samples=6",
        "callbacks.guided_eval.batch_size=6",
        "callbacks.guided_eval.num_steps=2",
        "callbacks.guided_eval.grid_size=6",
    ]
    result = train(compose_train(overrides))
    return tmp, images.parent, images, vae, weights, result


def eval_overrides(tmp: Path, shards: Path, weights: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        f"checkpoint={checkpoint}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp / 'runs'}",
        f"inception_weights={weights}",
        "logger.enabled=false",
        "num_samples=6",
        "batch_size=4",
        "sampler.steps=2",
        "grid_size=6",
        *extra,
    ]


def test_training_on_latents_samples_decodes_and_scores_images(trained):
    tmp, shards, images, _, _, result = trained
    assert result.global_step == 4 and result.checkpoint.is_file()
    config = load_ema(result.checkpoint, torch.device("cpu")).config
    assert (config.in_channels, config.input_size, config.num_classes) == (4, 8, 3)  # from the latents' meta.json
    rows = {row["setting"]: row for row in result.evaluations}
    assert set(rows) == {"none", "cfg", "sg"}
    for row in rows.values():
        assert math.isfinite(row["fid"]) and "toy classifier" in row["metric"] and row["num_samples"] == 6
        assert 0 <= row["class_accuracy"] <= 1  # the classifier saw decoded RGB images
    grid = Image.open(result.sample_grids[-1])
    assert grid.mode == "RGB" and grid.size == GRID  # decoded 32px images, not 8x8 latents
    # the reference statistics are the real images', cached with the image dataset
    assert stats_path(images, "classifier", "train").is_file()
    assert not (shards / "toy_latents" / "fid_stats").exists()


def test_evaluate_protocol_decodes_with_the_datasets_vae(trained):
    tmp, shards, _, _, weights, result = trained
    protocol = compose_config("evaluate", ["protocol=imagenet256"])
    assert (protocol.num_samples, protocol.extractor, protocol.reference_split) == (50000, "inception_tf", "train")
    assert (protocol.sampler.solver, protocol.sampler.steps, protocol.guidance.sg.scale) == ("euler", 40, 1.5)
    assert compose_config("evaluate", ["protocol=imagenet256_5k"]).num_samples == 5000  # the sweep fidelity
    # the protocol at toy size: 6 samples, 2 steps, scored by the small classifier (see the module docstring)
    extra = ("protocol=imagenet256_5k", "extractor=classifier")
    cfg = compose_config("evaluate", eval_overrides(tmp, shards, weights, result.checkpoint, *extra))
    assert (cfg.num_samples, cfg.reference_split, sorted(cfg.guidance)) == (6, "train", ["cfg", "none", "sg"])
    results = evaluate(cfg)
    assert results["reference"] == "toy_latents/train"
    for row in results["rows"]:
        assert math.isfinite(row["fid"]) and 0 <= row["precision"] <= 1
        assert Image.open(row["grid"]).size == GRID


def test_inception_features_of_decoded_samples(trained):
    _, shards, _, _, weights, result = trained
    latents = shards / "toy_latents"
    inception = build_extractor("inception", latents, weights=str(weights))
    assert inception.in_channels == 3  # the decoded images' channels, from meta.json's `images`
    model = load_ema(result.checkpoint, torch.device("cpu")).model
    vae = vae_for_dataset(read_meta(latents))
    setting = Setting("sg", sparse_guidance(1.5, 0.5, 0.9))
    args = ({"main": model}, Sampler("euler", 2), inception, 5, (4, 8, 8), 3)
    scored = sample_and_extract(setting, *args, batch_size=3, decode=vae, grid_size=5)
    assert scored.features.shape == (5, 2048) and np.isfinite(scored.features).all()
    assert scored.grid.shape == (5, 3, 32, 32) and scored.grid.dtype == torch.uint8
    with pytest.raises(ValueError, match="images=.*built for 3-channel images"):
        sample_and_extract(setting, *args, batch_size=3)  # undecoded latents never reach the extractor


def write_reference_batch(path: Path, dim: int = 2048, images: int = 8, **arrays) -> Path:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(64, dim))
    defaults = dict(
        mu=features.mean(0),
        sigma=np.cov(features, rowvar=False),
        arr_0=rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8),
    )
    np.savez(path, **{k: v for k, v in (defaults | arrays).items() if v is not None})
    return path


def test_adm_reference_batch_and_a_moved_vae_are_loaded_before_sampling(trained, tmp_path):
    tmp, shards, _, vae, weights, result = trained
    npz = write_reference_batch(tmp_path / "VIRTUAL_toy_labeled.npz")
    inception = build_extractor("inception_tf", shards / "toy_latents", weights=str(weights))
    ref = load_reference_batch(npz, inception)
    with np.load(npz) as z:
        assert np.array_equal(ref.mu, z["mu"]) and np.array_equal(ref.sigma, z["sigma"])
    assert ref.features.shape == (8, 2048) and ref.split == "reference_batch" and "VIRTUAL_toy" in ref.dataset
    moved = shutil.copytree(vae, tmp_path / "elsewhere" / "vae")  # the recorded path may not exist elsewhere
    overrides = eval_overrides(
        tmp, shards, weights, result.checkpoint, "extractor=inception_tf", f"reference_batch={npz}", f"vae={moved}"
    )
    evaluator = load_evaluator(compose_config("evaluate", overrides), None)
    assert evaluator.reference_name == str(npz) and np.array_equal(evaluator.reference.mu, ref.mu)
    assert evaluator.decode.source == str(moved.resolve()) and evaluator.metric == "FID (Inception, ADM TF pipeline)"


@pytest.mark.slow
def test_evaluate_inception_fid_against_an_adm_reference_batch(trained, tmp_path):
    """The whole Inception path; slow: the 2048-d Fréchet distance alone takes minutes on 2 busy cores."""
    tmp, shards, _, _, weights, result = trained
    npz = write_reference_batch(tmp_path / "VIRTUAL_toy_labeled.npz")
    overrides = eval_overrides(
        tmp,
        shards,
        weights,
        result.checkpoint,
        "extractor=inception_tf",
        f"reference_batch={npz}",
        "guidance=[sg]",
        f"out_dir={tmp_path / 'eval'}",
    )
    results = evaluate(compose_config("evaluate", overrides))
    [row] = results["rows"]
    assert results["reference"] == str(npz) and results["metric"] == "FID (Inception, ADM TF pipeline)"
    assert math.isfinite(row["fid"]) and 0 <= row["precision"] <= 1 and Image.open(row["grid"]).size == GRID


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(mu=None), r"reference_batch=.*has no \['mu'\]"),
        (dict(mu=np.zeros(16), sigma=np.eye(16)), r"reference_batch=.*must be \(2048,\)"),
        (dict(arr_0=np.zeros((2, 32, 32), np.uint8)), r"reference_batch=.*arr_0 is uint8 \(2, 32, 32\)"),
    ],
)
def test_bad_reference_batch_fails_before_sampling(trained, tmp_path, arrays, match):
    tmp, shards, _, _, weights, result = trained
    npz = write_reference_batch(tmp_path / "ref.npz", **arrays)
    overrides = eval_overrides(
        tmp, shards, weights, result.checkpoint, "extractor=inception_tf", f"reference_batch={npz}"
    )
    with pytest.raises(ValueError, match=match):
        evaluate(compose_config("evaluate", overrides))


def test_decoding_with_other_vae_weights_fails_before_sampling(trained, tmp_path):
    tmp, shards, _, _, weights, result = trained
    other = save_tiny_vae(tmp_path / "other", seed=7)
    overrides = eval_overrides(tmp, shards, weights, result.checkpoint, "extractor=inception", f"vae={other}")
    with pytest.raises(ValueError, match="vae=.*other.*has weights .* but toy_latents was encoded with"):
        evaluate(compose_config("evaluate", overrides))


def test_experiments_match_the_paper_recipe():
    for name, model, span in (
        ("imagenet256_sit_xl2_tread", "SiT-XL/2", "2:24"),
        ("imagenet256_sit_b2_tread", "SiT-B/2", "2:8"),
    ):
        cfg = compose_train([f"experiment={name}"])
        assert (cfg.model.name, list(cfg.routing.spans), cfg.routing.sparsity) == (model, [span], 0.5)
        assert (cfg.data.name, cfg.data.global_batch_size, cfg.data.hflip) == ("imagenet256_latents", 256, True)
        assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
            1e-4,
            [0.9, 0.999],
            0.0,
            0,
        )
        assert (cfg.optim.ema_decay, cfg.model.class_dropout_prob, cfg.trainer.precision) == (0.9999, 0.1, "bf16-mixed")
