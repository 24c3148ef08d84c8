"""protocol=adm: ADM's evaluator pipeline (``inception_tf``), sFID and ADM's Inception Score.

The real ``inception-2015-12-05.pt`` and TensorFlow are not on these machines: a random
TorchScript module with the real file's interface (``StandInInception``: named ``layers`` with a
``mixed_6`` block, ``output``, a ``forward`` that resizes inside as the real file's code does)
stands in for it. What is checked here: our preprocessing + one network pass give the features
of clean-fid's own ``legacy_tensorflow`` mode on the same PNG files; the resize is TF1's
``resize_bilinear`` formula; sFID and the Inception Score equal a direct numpy transcription of
ADM's formulas; the reference-batch statistics (mu_s, sigma_s) and the cache round-trip; a
legacy reference batch with clean features fails naming both; and the load-time self-check
rejects a network whose forward differs from the pass it emulates.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import linalg
from test_eval_metrics import StandInBlock, StandInInception, save_stand_in, write_pngs

from sgexp.data import ensure_prepared, read_split
from sgexp.diffusion import Sampler
from sgexp.diffusion.guidance import cfg
from sgexp.eval import build_extractor, load_reference_batch, metrics_from_features, reference_stats, stats_path
from sgexp.eval.adm_inception import SPATIAL_DIM, load_torchscript, tf1_resize_bilinear
from sgexp.eval.features import InceptionExtractor, InceptionTFExtractor
from sgexp.eval.metrics import ReferenceStats, extract_with_spatial, inception_score
from sgexp.eval.sampling import Setting, sample_and_extract
from sgexp.eval.scoring import load_scoring

pytestmark = [  # the file format of the weights, also in clean-fid's InceptionV3W
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The stand-in under the real file's name, in its own folder (clean-fid's InceptionV3W reads it there)."""
    return save_stand_in(tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt")


@pytest.fixture(scope="module")
def tf_extractor(weights):
    return InceptionTFExtractor(weights, in_channels=3)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return ensure_prepared("digits", tmp_path_factory.mktemp("shards"))


def random_images(n: int, height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=gen, dtype=torch.uint8)


# ----------------------------------------------------------------------------- ADM's formulas in numpy


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """ADM's ``FIDStatistics.frechet_distance`` (evaluations/evaluator.py), transcribed."""
    diff = mu1 - mu2
    covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def adm_inception_score(preds: np.ndarray, split_size: int = 5000) -> float:
    """ADM's ``Evaluator.compute_inception_score`` after the softmax, transcribed."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def peaky_logits(rng, n: int, chunk: int) -> np.ndarray:
    """Logits whose last (short) chunk favours 5 classes: per-chunk marginals differ from the global one."""
    logits = rng.normal(size=(n, 50)) * 3
    logits[2 * chunk :, :5] += 6
    return logits


def test_inception_score_equals_adms_on_12000_softmax_rows():
    probs = softmax(peaky_logits(np.random.default_rng(0), 12000, 5000))  # chunks 5000 + 5000 + 2000
    ours = inception_score(probs, split_size=5000)
    assert ours == pytest.approx(adm_inception_score(probs, 5000), rel=1e-9)
    assert abs(inception_score(probs) - ours) > 0.1  # the splits matter on these rows
    with pytest.raises(ValueError, match="split_size=0 is invalid"):
        inception_score(probs, split_size=0)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_fid_sfid_and_inception_score_rows_equal_adms_formulas_on_fixed_features():
    rng = np.random.default_rng(0)
    n = 1200  # IS in splits of 500: 500 + 500 + 200, the split logic as metrics_from_features runs it
    pool, spatial = rng.normal(size=(n, 16)), rng.normal(size=(n, 24)) * 2 + 0.5
    real_pool, real_spatial = rng.normal(size=(900, 16)) * 1.1, rng.normal(size=(900, 24)) * 2
    logits = peaky_logits(rng, n, 500)
    ref = ReferenceStats(
        *statistics(real_pool), real_pool.astype(np.float32), 900, "test", "train", "", *statistics(real_spatial)
    )
    ours = metrics_from_features(pool, logits, None, ref, spatial=spatial, is_split_size=500)
    assert ours["fid"] == pytest.approx(adm_frechet_distance(*statistics(pool), ref.mu, ref.sigma), rel=1e-9)
    assert ours["sfid"] == pytest.approx(adm_frechet_distance(*statistics(spatial), ref.mu_s, ref.sigma_s), rel=1e-9)
    assert ours["inception_score"] == pytest.approx(adm_inception_score(softmax(logits), 500), rel=1e-9)
    one_split = metrics_from_features(pool, logits, None, ref)["inception_score"]  # the classifier's analogue
    assert (
        one_split == pytest.approx(inception_score(softmax(logits)), rel=1e-9) and one_split != ours["inception_score"]
    )
    assert "sfid" not in metrics_from_features(pool, None, None, ref)
    with pytest.raises(ValueError, match="spatial=.*one row per sample"):
        metrics_from_features(pool, None, None, ref, spatial=spatial[:10])


def test_sfid_is_nan_without_spatial_reference_statistics(caplog):
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(50, 4))
    ref = ReferenceStats(*statistics(pool), pool.astype(np.float32), 50, "test", "reference_batch")
    with caplog.at_level(logging.WARNING, logger="sgexp.eval"):
        metrics = metrics_from_features(pool, None, None, ref, spatial=rng.normal(size=(50, 3)))
    assert np.isnan(metrics["sfid"]) and "sFID reported as nan" in caplog.text


# ----------------------------------------------------------------------------- the pipeline


def tf1_resize_reference(image: np.ndarray, size: int) -> np.ndarray:
    """TF1 ``resize_bilinear(align_corners=False)`` (C, H, W): output pixel i samples i * in / out."""

    def axis(n_in: int):
        src = np.arange(size) * (n_in / size)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (y0, y1, fy), (x0, x1, fx) = axis(image.shape[1]), axis(image.shape[2])
    rows = image[:, y0] * (1 - fy)[None, :, None] + image[:, y1] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx


@pytest.mark.parametrize("size", [299, 7])
def test_the_resize_is_tf1_resize_bilinear(size):
    image = torch.rand(1, 3, 13, 21, generator=torch.Generator().manual_seed(0)) * 255
    ours = tf1_resize_bilinear(image, size)[0].double().numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(image[0].double().numpy(), size), atol=2e-3)
    half_pixel = torch.nn.functional.interpolate(image, (size, size), mode="bilinear", align_corners=False)
    assert (tf1_resize_bilinear(image, size) - half_pixel).abs().max() > 1  # not TF2's / PyTorch's resize


def test_pool_features_equal_cleanfids_legacy_tensorflow_mode(tmp_path, weights, tf_extractor, digits):
    """Our prepare + network pass = clean-fid's own legacy_tensorflow path on the same PNG files."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=True)  # never clean-fid's /tmp cache
    grey = build_extractor("inception_tf", digits, weights=str(weights))  # 8x8 grey digits -> RGB, as PIL does
    for name, extractor, images in (
        ("rgb", tf_extractor, random_images(7)),
        ("grey", grey, read_split(digits, "val")[0][:9]),
    ):
        folder = write_pngs(tmp_path / name, images)
        theirs = get_folder_features(
            str(folder), model, num_workers=0, batch_size=4, device=torch.device("cpu"), mode="legacy_tensorflow"
        )
        ours = extractor(images).numpy()
        assert ours.shape == theirs.shape == (len(images), 2048)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.std(0).mean() > 1e-3  # the features do depend on the image


@torch.no_grad()
def test_one_pass_gives_pool_spatial_features_and_adms_logits(weights, tf_extractor, digits):
    images = random_images(5, 33, 47, seed=1)
    pool, spatial = tf_extractor.features_and_spatial(images)
    torch.testing.assert_close(pool, tf_extractor(images), rtol=0, atol=0)
    assert spatial.shape == (5, SPATIAL_DIM) == (5, 7 * 17 * 17)
    # first 7 channels of mixed_6's conv branch, flattened in TF's NHWC order (as ADM's mu_s/sigma_s are)
    network = load_torchscript(weights)
    h = (tf1_resize_bilinear(images.float()) - 128) / 128
    for name, layer in network.layers.named_children():
        if name == "mixed_6":
            break
        h = layer(h)
    conv = network.layers.mixed_6.conv(h)
    torch.testing.assert_close(spatial.reshape(5, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1))
    # ADM's IS input: softmax(pool3 @ W) without the output bias = the network's own no_output_bias output
    probs = softmax(tf_extractor.logits_from_features(pool.numpy()).astype(np.float64))
    np.testing.assert_allclose(probs, network(images.float(), no_output_bias=True).numpy(), rtol=1e-4, atol=1e-7)
    assert tf_extractor.num_classes is None and tf_extractor.is_split_size == 5000  # no class accuracy
    clean = InceptionExtractor(weights, in_channels=3)
    assert "sha256=" in tf_extractor.identity and "TF1 bilinear" in tf_extractor.identity
    assert tf_extractor.identity != clean.identity  # cached statistics of the two pipelines never mix
    assert stats_path(digits, tf_extractor.name, "train") != stats_path(digits, clean.name, "train")


def test_reference_stats_cache_the_spatial_moments(digits, weights, caplog):
    extractor = build_extractor("inception_tf", digits, weights=str(weights))
    ref = reference_stats(extractor, digits, "val", batch_size=64)
    assert stats_path(digits, "inception_tf", "val").is_file()
    pool, spatial = extract_with_spatial(extractor, read_split(digits, "val")[0], batch_size=50)
    np.testing.assert_allclose(ref.mu, pool.mean(0, dtype=np.float64), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ref.mu_s, spatial.mean(0, dtype=np.float64), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ref.sigma_s, np.cov(spatial, rowvar=False), rtol=1e-5, atol=1e-8)
    with caplog.at_level(logging.INFO, logger="sgexp.eval"):
        again = reference_stats(extractor, digits, "val", batch_size=64)
    assert "computing reference statistics" not in caplog.text
    np.testing.assert_array_equal(again.sigma_s, ref.sigma_s)


# ----------------------------------------------------------------------------- ADM reference batches


def write_adm_batch(path, images: torch.Tensor, spatial: bool = True):
    rng = np.random.default_rng(0)
    pool, space = rng.normal(size=(64, 2048)), rng.normal(size=(64, SPATIAL_DIM))
    arrays = dict(arr_0=images.permute(0, 2, 3, 1).numpy())
    arrays["mu"], arrays["sigma"] = statistics(pool)
    if spatial:
        arrays["mu_s"], arrays["sigma_s"] = statistics(space)
    np.savez(path, **arrays)
    return path


def test_adm_reference_batch_round_trips_into_reference_stats(tmp_path, tf_extractor, caplog):
    images = random_images(6, 32, 32, seed=2)
    npz = write_adm_batch(tmp_path / "VIRTUAL_toy_labeled.npz", images)
    with caplog.at_level(logging.INFO, logger="sgexp.progress"):  # two batches of 4 and 2, progress off a tty
        ref = load_reference_batch(npz, tf_extractor, batch_size=4)
    assert "reference batch VIRTUAL_toy_labeled.npz (inception_tf): 6/6 images (100%)" in caplog.text
    with np.load(npz) as z:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(getattr(ref, key), z[key])
    np.testing.assert_array_equal(ref.features, tf_extractor(images).numpy())  # arr_0 through the same pass
    assert ref.extractor == tf_extractor.identity and ref.split == "reference_batch"
    with caplog.at_level(logging.WARNING, logger="sgexp.eval"):
        without = load_reference_batch(write_adm_batch(tmp_path / "old.npz", images, spatial=False), tf_extractor)
    assert without.mu_s is None and "no mu_s/sigma_s" in caplog.text
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=ref.mu, sigma=ref.sigma, mu_s=np.zeros(5), sigma_s=np.eye(5))
    with pytest.raises(ValueError, match=r"reference_batch=.*mu_s \(5,\) and sigma_s \(5, 5\) must be \(2023,\)"):
        load_reference_batch(bad, tf_extractor)


def test_a_legacy_reference_batch_with_clean_features_fails_naming_both(tmp_path, weights, digits):
    npz = write_adm_batch(tmp_path / "VIRTUAL_toy_labeled.npz", random_images(2, 16, 16))
    clean = InceptionExtractor(weights, in_channels=3)
    message = (
        r"reference_batch=.*VIRTUAL_toy_labeled.npz.*TensorFlow.*extractor='inception'.*use extractor=inception_tf"
    )
    with pytest.raises(ValueError, match=message):
        load_reference_batch(npz, clean)
    with pytest.raises(ValueError, match=message):  # what sgexp.evaluate does, before any sampling
        load_scoring("inception", digits, "train", str(npz), weights=str(weights))


# ----------------------------------------------------------------------------- the load-time self-check


class HalfPixelResize(StandInInception):
    """Resizes like PyTorch / TF2 (half-pixel centres), not like TF1."""

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        features = self.pool3(torch.nn.functional.interpolate(img.float(), size=[299, 299], mode="bilinear"))
        if return_features:
            return features
        return torch.softmax(torch.nn.functional.linear(features, self.output.weight), 1)


class BiasAlways(StandInInception):
    """Keeps the output bias where ADM's softmax has none."""

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        features = self.pool3(self.resize(img))
        return features if return_features else torch.softmax(self.output(features), 1)


class TowerFirst(StandInInception):
    """mixed_6's ``conv`` branch is not the first channels of the block's output."""

    def __init__(self):
        super().__init__()
        self.layers.mixed_6 = TowerFirstBlock(8, 8, 8)


class TowerFirstBlock(StandInBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.conv(x)], 1)


class NoMixed6(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Conv2d(3, 2048, 3), torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize(
    "network,match",
    [
        (HalfPixelResize, "pool3 features .* against network\\(x, return_features=True\\) differ by"),
        (BiasAlways, "softmax\\(pool3 @ output.weight\\) against network\\(x, no_output_bias=True\\) differ by"),
        (TowerFirst, "mixed_6.conv\\[:, :7\\] against the first 7 channels"),
        (NoMixed6, "needs `layers.mixed_6.conv` and `output`"),
    ],
)
def test_self_check_rejects_a_network_whose_forward_differs_from_the_emulated_pass(tmp_path, network, match):
    path = save_stand_in(tmp_path / "inception-2015-12-05.pt", network)
    with pytest.raises(ValueError, match=f"weights=.*{tmp_path.name}.*inception-2015-12-05.pt.*{match}"):
        InceptionTFExtractor(path, in_channels=3)


# ----------------------------------------------------------------------------- sampling


def test_sampling_keeps_spatial_features_in_index_order(model, tf_extractor):
    setting, sampler = Setting("cfg", cfg(1.5)), Sampler("euler", 2)
    args = (setting, {"main": model}, sampler, tf_extractor, 5, (3, 8, 8), 5)
    scored = sample_and_extract(*args, batch_size=2, grid_size=5, labels="uniform", show_progress=False)
    assert scored.features.shape == (5, 2048) and scored.spatial.shape == (5, SPATIAL_DIM)
    assert scored.logits is None  # ADM's IS logits come from the gathered pool features
    pool, spatial = tf_extractor.features_and_spatial(scored.grid)  # the same images, by index
    np.testing.assert_allclose(scored.spatial, spatial.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scored.features, pool.numpy(), rtol=1e-5, atol=1e-6)
    again = sample_and_extract(*args, batch_size=5, labels="uniform", show_progress=False)
    np.testing.assert_allclose(again.spatial, scored.spatial, rtol=1e-5, atol=1e-6)  # batch size does not matter
