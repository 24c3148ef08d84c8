"""sgexp.eval: extractors, the domain classifier, FID (against clean-fid and torchmetrics), precision/recall.

Everything runs on real data: scikit-learn's 8x8 digits, with a classifier trained
on them once per module (a few seconds). The real Inception network cannot be
tested offline (no machine here has its weights); its plumbing — clean-fid's
"clean" resize, the normalisation, the equivalence with clean-fid's own pipeline —
is tested with a small random TorchScript module standing in for
``inception-2015-12-05.pt``, and the missing-weights error path is tested as is.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from sgexp.data import ensure_prepared, read_split
from sgexp.eval import (
    CleanFIDAdapter,
    build_extractor,
    compute_metrics,
    fid_from_features,
    inception_score,
    precision_recall,
    reference_stats,
    stats_path,
    train_classifier,
)
from sgexp.eval import features as features_module
from sgexp.eval.metrics import RunningMoments, extract, metrics_from_features
from sgexp.eval.scoring import choose_extractor, load_scoring


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return ensure_prepared("digits", tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def trained(digits):
    return train_classifier(digits, epochs=15)


@pytest.fixture(scope="module")
def extractor(digits, trained):
    return build_extractor("classifier", digits)


@pytest.fixture(scope="module")
def splits(digits):
    return {split: read_split(digits, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def ref(extractor, digits):
    return reference_stats(extractor, digits, "train")


def write_pngs(folder, images: torch.Tensor):
    folder.mkdir()
    for i, image in enumerate(images.numpy()):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
    return folder


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ----------------------------------------------------------------------------- classifier


def test_classifier_trains_saves_and_extracts(digits, trained, extractor, splits):
    sidecar = json.loads((digits / "classifier.json").read_text())
    assert sidecar == trained
    assert trained["val_accuracy"] >= 0.9 and trained["n_train"] == len(splits["train"][0])
    assert {"epochs", "seconds", "date", "sha256"} <= set(sidecar)
    assert (extractor.name, extractor.dim, extractor.num_classes) == ("classifier", 128, 10)
    assert extractor.label == "domain FID (digits classifier)"
    images, labels = splits["val"]
    feats, logits = extractor(images[:32]), extractor.logits(images[:32])
    assert feats.shape == (32, 128) and feats.dtype == torch.float32 and (feats >= 0).all()  # post-ReLU
    assert logits.shape == (32, 10)
    torch.testing.assert_close(extractor.features_and_logits(images[:32]), (feats, logits))


# ----------------------------------------------------------------------------- FID


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # inside clean-fid
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units, see metrics.fid_from_features
def test_fid_equals_cleanfid_compute_fid(tmp_path, extractor, splits, ref):
    """Our cached-statistics FID = clean-fid's folder-to-folder FID with the same extractor."""
    from cleanfid import fid as cleanfid

    fake_dir = write_pngs(tmp_path / "fake", splits["val"][0])
    real_dir = write_pngs(tmp_path / "real", splits["train"][0])
    ours = compute_metrics(extractor, splits["val"][0], splits["val"][1], ref)["fid"]
    theirs = cleanfid.compute_fid(
        str(fake_dir),
        str(real_dir),
        mode="clean",
        custom_feat_extractor=CleanFIDAdapter(extractor),
        custom_fn_resize=extractor.cleanfid_resize(),  # the classifier sees native-size images, as in ours
        num_workers=0,
        device=torch.device("cpu"),
        verbose=False,
    )
    assert relative(ours, theirs) < 1e-3, (ours, theirs)


def test_fid_matches_torchmetrics(extractor, splits, ref):
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=extractor)  # reads extractor.num_features
    for images, real in ((splits["train"][0], True), (splits["val"][0], False)):
        for batch in images.split(500):
            metric.update(batch, real=real)
    ours = compute_metrics(extractor, splits["val"][0], None, ref)["fid"]
    assert relative(ours, float(metric.compute())) < 1e-3  # float64 sums + eigenvalues vs np.cov + sqrtm


def test_real_data_scores_well_and_noise_badly(extractor, splits, ref):
    images, labels = splits["val"]
    real = compute_metrics(extractor, images, labels, ref, batch_size=64)
    noise_images = torch.randint(0, 256, images.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise = compute_metrics(extractor, noise_images, labels, ref)
    assert set(real) == {"fid", "precision", "recall", "class_accuracy", "inception_score", "num_samples"}
    assert real["num_samples"] == len(images)
    assert noise["fid"] > 20 * real["fid"], (real, noise)
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    # with 180 points in 128-d the k-NN balls of the real set are wide: noise still lands in ~half of them
    assert noise["precision"] < real["precision"] - 0.2 and noise["recall"] < 0.1
    assert real["class_accuracy"] > 0.9 and noise["class_accuracy"] < 0.5
    assert real["inception_score"] > 6 > noise["inception_score"]
    assert "class_accuracy" not in compute_metrics(extractor, images, None, ref)
    feats, logits = extract(extractor, images, with_logits=True)  # the path of multi-process evaluation
    assert metrics_from_features(feats, logits, labels.numpy(), ref) == pytest.approx(real)


def test_running_moments_match_numpy(splits, extractor):
    feats, _ = extract(extractor, splits["train"][0])
    moments = RunningMoments(feats.shape[1])
    for chunk in np.array_split(feats, 7):
        moments.update(chunk)
    np.testing.assert_allclose(moments.mean, feats.mean(0, dtype=np.float64), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(moments.cov, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-10)


def test_fid_from_features_is_zero_on_itself_and_checks_shapes():
    feats = np.random.default_rng(0).normal(size=(400, 8))
    assert abs(fid_from_features(feats, feats.mean(0), np.cov(feats, rowvar=False))) < 1e-6
    with pytest.raises(ValueError, match="dim 9"):
        fid_from_features(feats, np.zeros(9), np.eye(9))


# ----------------------------------------------------------------------------- reference statistics cache


def test_reference_cache_reused_then_recomputed_when_extractor_changes(extractor, digits, ref, caplog, monkeypatch):
    path = stats_path(digits, "classifier", "train")
    assert path.is_file() and ref.n == len(read_split(digits, "train")[0]) and ref.split == "train"
    assert ref.features.shape == (ref.n, 128) and ref.extractor == extractor.identity
    with caplog.at_level(logging.INFO, logger="sgexp.eval"):
        again = reference_stats(extractor, digits, "train")
        assert "computing reference statistics" not in caplog.text
        np.testing.assert_array_equal(again.sigma, ref.sigma)

        monkeypatch.setattr(extractor, "identity", "classifier.pt sha256=other")
        with pytest.raises(ValueError, match="other weights"):
            compute_metrics(extractor, read_split(digits, "val")[0], None, ref)
        fresh = reference_stats(extractor, digits, "train", max_features=100)
        assert "stale" in caplog.text and "computing reference statistics for digits/train" in caplog.text
        assert fresh.extractor == "classifier.pt sha256=other" and len(fresh.features) == 100
        np.testing.assert_allclose(fresh.mu, ref.mu)  # same weights really: same statistics
    monkeypatch.undo()
    assert reference_stats(extractor, digits, "train").extractor == extractor.identity  # recomputed back


# ----------------------------------------------------------------------------- precision / recall, IS


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)) * 100.0
    real = np.concatenate([c + rng.normal(size=(60, 16)) for c in centres])
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    same = np.concatenate([c + rng.normal(size=(60, 16)) for c in centres])
    precision, recall = precision_recall(real, same)
    assert precision > 0.7 and recall > 0.7  # a fresh draw: k=3 balls of 60 points in 16-d miss the fringe
    assert precision_recall(real, real + 1e4) == (0.0, 0.0)
    two_modes = np.concatenate([c + rng.normal(size=(300, 16)) for c in centres[:2]])
    precision, recall = precision_recall(real, two_modes)
    assert precision > 0.7 and 0.1 < recall <= 0.2  # 2 of 10 modes: at most 120 of the 600 real points
    with pytest.raises(ValueError, match="N > k=3"):
        precision_recall(real, real[:3])


def test_inception_score_bounds():
    confident = np.eye(10)[np.arange(100) % 10]
    assert inception_score(confident) == pytest.approx(10.0)
    assert inception_score(np.tile(np.eye(10)[3], (100, 1))) == pytest.approx(1.0)
    assert inception_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_fails_clearly(tmp_path, digits, extractor, ref, splits):
    with pytest.raises(ValueError, match=r"name='vgg' is invalid: must be one of"):
        build_extractor("vgg", digits)
    with pytest.raises(ValueError, match="classifier of mnist5k"):
        build_extractor("mnist", digits)
    untrained = tmp_path / "digits"
    untrained.mkdir()
    shutil.copy(digits / "meta.json", untrained / "meta.json")
    with pytest.raises(FileNotFoundError, match="python -m sgexp.data classifier digits"):
        build_extractor("classifier", untrained)
    with pytest.raises(ValueError, match="1-channel images"):
        extractor(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be a uint8 tensor"):
        extractor(torch.zeros(2, 1, 8, 8))
    images, labels = splits["val"]
    with pytest.raises(ValueError, match="one label per image"):
        compute_metrics(extractor, images, labels[:5], ref)
    with pytest.raises(ValueError, match="N >= 2"):
        compute_metrics(extractor, images[:1], None, ref)


def test_cli(digits, trained, capsys):
    from sgexp.data.__main__ import main

    main(["ref-stats", digits.name, "--root", str(digits.parent), "--extractor", "classifier", "--split", "val"])
    assert "classifier_val.npz: 180 images, dim 128" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["ref-stats", digits.name, "--root", str(digits.parent), "--extractor", "vgg"])
    assert exit_info.value.code == 2 and "name='vgg' is invalid" in capsys.readouterr().err


def test_auto_means_the_datasets_classifier_else_the_entry_points_fallback(tmp_path, digits, trained, ref):
    """One meaning of extractor=auto for sgexp.evaluate (falls back to Inception) and the training
    callback (falls back to grids only)."""
    assert choose_extractor("auto", digits) == choose_extractor("auto", digits, "none") == "classifier"
    untrained = tmp_path / "digits"
    untrained.mkdir()
    shutil.copy(digits / "meta.json", untrained / "meta.json")
    assert choose_extractor("auto", untrained) == "inception"
    assert choose_extractor("auto", untrained, without_classifier="none") == "none"
    assert choose_extractor("inception", digits, "none") == "inception"  # only auto falls back
    with pytest.raises(ValueError, match="extractor='vgg' is invalid"):
        choose_extractor("vgg", digits)
    scoring = load_scoring("auto", digits, "train")
    assert scoring.reference_name == "digits/train" and scoring.decode is None
    np.testing.assert_array_equal(scoring.reference.mu, ref.mu)
    grids_only = load_scoring("auto", untrained, "train", without_classifier="none")
    assert grids_only.extractor is None and grids_only.reference is None


# ----------------------------------------------------------------------------- Inception


def test_inception_without_weights_names_file_url_and_where(tmp_path, digits, monkeypatch):
    monkeypatch.delenv(features_module.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(features_module, "cleanfid_cache_dir", lambda: tmp_path)  # empty clean-fid cache
    monkeypatch.setattr(features_module, "internet_reachable", lambda url, timeout=3.0: False)
    with pytest.raises(FileNotFoundError) as error:
        build_extractor("inception", digits)
    message = str(error.value)
    url = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
    assert "inception-2015-12-05.pt" in message and url in message and "SGEXP_INCEPTION_WEIGHTS" in message
    monkeypatch.setenv(features_module.WEIGHTS_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FileNotFoundError, match="SGEXP_INCEPTION_WEIGHTS=.*nowhere.pt"):
        build_extractor("inception", digits)


class StandInBlock(torch.nn.Module):
    """Like Inception's mixed blocks: a 1x1 ``conv`` branch (conv + ReLU) first in the concatenation."""

    def __init__(self, channels: int, conv: int, tower: int):
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(channels, conv, 1), torch.nn.ReLU())
        self.tower = torch.nn.Sequential(torch.nn.Conv2d(channels, tower, 3, padding=1), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class StandInInception(torch.nn.Module):
    """Random network with the interface of clean-fid's TorchScript ``inception-2015-12-05.pt``.

    ``layers``: a chain of named children, 3x299x299 in [-1, 1] -> 2048 (clean-fid's "clean" mode
    calls it alone), with a ``mixed_6`` block whose ``conv`` branch is 17x17 like the real one's;
    ``output``: Linear 2048 -> 1008; ``forward`` does what the real file's printed TorchScript code
    does: TF1's bilinear resize to 299 (affine_grid + grid_sample, grid shifted by 1/in - 1/299),
    (x - 128) / 128, ``layers``; pool3 with ``return_features``, else the softmax (bias dropped
    with ``no_output_bias``).
    """

    def __init__(self):
        super().__init__()
        layers = [
            ("conv", torch.nn.Conv2d(3, 8, 3, stride=2)),  # 299 -> 149
            ("conv_1", torch.nn.Tanh()),
            ("pool0", torch.nn.AdaptiveAvgPool2d(17)),
            ("mixed_6", StandInBlock(8, 8, 8)),
            ("pool1", torch.nn.AdaptiveAvgPool2d(4)),
            ("flatten", torch.nn.Flatten()),
            ("pool2", torch.nn.Linear(16 * 4 * 4, 2048)),
        ]
        self.layers = torch.nn.Sequential(OrderedDict(layers))
        self.output = torch.nn.Linear(2048, 1008)

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        features = self.pool3(self.resize(img))
        if return_features:
            return features
        if no_output_bias:
            return torch.softmax(torch.nn.functional.linear(features, self.output.weight), 1)
        return torch.softmax(self.output(features), 1)

    def resize(self, img: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += theta[0, 0] / width - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / height - theta[1, 1] / 299
        theta = theta.to(x.dtype).unsqueeze(0).repeat(batch_size, 1, 1)
        grid = torch.nn.functional.affine_grid(theta, [batch_size, channels, 299, 299], False)
        return torch.nn.functional.grid_sample(x, grid, "bilinear", "border", False)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """299x299 images in 0..255 -> (B, 2048)."""
        return self.layers((x - 128.0) / 128.0).reshape(-1, 2048)


def save_stand_in(path, network: type[torch.nn.Module] = StandInInception, seed: int = 0):
    """A scripted stand-in for inception-2015-12-05.pt at ``path`` (the real file is a TorchScript too)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.jit.script(network()).save(str(path))
    return path


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # the file format of the weights
def test_inception_plumbing_matches_cleanfid_with_a_stand_in_network(tmp_path, digits, splits, monkeypatch):
    """Resize, channel handling and normalisation equal clean-fid's own "clean" pipeline on PNG files.

    A random TorchScript module stands in for inception-2015-12-05.pt (not available offline).
    """
    from cleanfid.fid import get_folder_features
    from cleanfid.utils import ResizeDataset

    weights = save_stand_in(tmp_path / "stand-in.pt")
    monkeypatch.setenv(features_module.WEIGHTS_ENV, str(weights))
    inception = build_extractor("inception", digits)  # found through the environment variable
    assert (inception.name, inception.dim, inception.label) == ("inception", 2048, "FID (Inception)")
    images = splits["val"][0][:12]
    folder = write_pngs(tmp_path / "pngs", images)

    prepared = inception.prepare(images)
    assert prepared.shape == (12, 3, 299, 299) and prepared.dtype == torch.float32
    theirs = ResizeDataset(sorted(str(p) for p in folder.iterdir()), mode="clean")
    torch.testing.assert_close(prepared, torch.stack([theirs[i] for i in range(12)]), rtol=0, atol=0)

    ours = inception(images)
    reference = get_folder_features(
        str(folder),
        CleanFIDAdapter(inception),
        num_workers=0,
        batch_size=5,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    assert ours.shape == (12, 2048)
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-5, atol=1e-5)
    assert ours.std(0).mean() > 1e-3  # the features do depend on the image
    with pytest.raises(NotImplementedError, match="2048-d pool features"):
        inception.logits(images)
    assert "inception" in inception.identity and "sha256=" in inception.identity


# ----------------------------------------------------------------------------- the real domain classifier


@pytest.mark.slow
def test_mnist5k_classifier_reaches_97_percent(tmp_path):
    directory = ensure_prepared("mnist5k", tmp_path)
    assert train_classifier(directory)["val_accuracy"] >= 0.97
    assert build_extractor("mnist", directory).label == "domain FID (mnist5k classifier)"
