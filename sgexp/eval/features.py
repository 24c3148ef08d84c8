"""Feature extractors for FID: clean-fid's Inception-V3, ADM's TensorFlow pipeline on the same
weights, and the project's own classifier.

Every extractor maps uint8 images (B, C, H, W) in [0, 255] to float32 features
(B, dim) in two steps, so that clean-fid can drive the second one on its own
inputs (``CleanFIDAdapter``) and the two FIDs can be compared exactly:

- ``prepare``: geometry only, uint8 -> float 0..255 at the network's input size
  (``inception``: grey repeated to RGB, then clean-fid's "clean" resize to 299x299;
  ``inception_tf``: grey repeated to RGB, no resize: the network resizes as TF did);
- ``embed``: float 0..255 -> features (normalisation + network).

``identity`` names the weights (a SHA-256 of the file) and the pipeline: reference
statistics computed with other weights or another resize are not reused (see
``reference_cache.reference_stats``, whose cache file is also named after the extractor).

``inception_tf`` is ADM's evaluator (``sgexp.eval.adm_inception``): pool3 features for
FID, spatial features (``spatial_dim`` > 0) for sFID, and the Inception Score's logits
computed from the pool features (``logits_from_features``), all from one network pass.

Inception weights (``inception-2015-12-05.pt``, the TorchScript port of the
TensorFlow FID network that clean-fid uses; Parmar et al. 2022, "On Aliased
Resizing and Surprising Subtleties in GAN Evaluation") are looked up, in order:
the ``weights`` argument, ``$SGEXP_INCEPTION_WEIGHTS``, clean-fid's own cache;
then clean-fid's download if the internet answers. Otherwise ``build_extractor``
fails at once, naming the file, its URL and where to put it.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn

from sgexp.checks import check_choice, fail
from sgexp.data import read_meta
from sgexp.data.latent_format import image_channels, image_dataset_dir
from sgexp.eval.adm_inception import SPATIAL_DIM, load_adm_inception, load_torchscript
from sgexp.eval.classifier import CHECKPOINT, file_sha256, load_classifier, normalise
from sgexp.weights import internet_reachable

log = logging.getLogger("sgexp.eval.features")

EXTRACTORS = ("inception", "inception_tf", "classifier")
ALIASES = {"mnist": "classifier"}  # "mnist": the classifier of mnist5k, the project's default domain FID
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
WEIGHTS_ENV = "SGEXP_INCEPTION_WEIGHTS"


class FeatureExtractor(nn.Module):
    """uint8 images (B, C, H, W) in [0, 255] -> float32 features (B, dim); see the module docstring."""

    name: str
    label: str  # what reports call the metric
    dim: int
    num_classes: int | None = None  # classes of the dataset the logits score (class accuracy); None: none
    prepared_channels: int  # channels of ``prepare``'s output, i.e. of the network input
    spatial_dim: int = 0  # > 0: ``features_and_spatial`` also gives sFID's spatial features
    is_split_size: int | None = None  # Inception Score per chunk of this many samples (ADM: 5000); None: one

    def __init__(self, in_channels: int, identity: str):
        super().__init__()
        self.in_channels = in_channels
        self.identity = identity

    @property
    def num_features(self) -> int:
        # torchmetrics' FrechetInceptionDistance(feature=module) reads this instead of probing
        # the module with a 3x299x299 dummy image, which a grey 28x28 extractor would reject
        return self.dim

    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    def check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            what = f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
            raise fail("images", what, "must be a uint8 tensor (B, C, H, W) with values in [0, 255]")
        if images.shape[1] != self.in_channels:
            raise fail(
                "images",
                f"shape {tuple(images.shape)}",
                f"the {self.name} extractor was built for {self.in_channels}-channel images (the dataset's meta.json)",
            )

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.embed(self.prepare(images).to(self.device))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} extractor has no class logits")

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and (if the extractor classifies) logits; the classifier does both in one pass."""
        return self(images), None

    def features_and_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and (if ``spatial_dim``) sFID's spatial features, from one network pass."""
        return self(images), None

    def logits_from_features(self, features: np.ndarray) -> np.ndarray | None:
        """Inception-Score logits computed from (gathered) features, or None where logits come from the
        network pass instead (the classifier: ``features_and_logits``) or not at all."""
        return None

    def cleanfid_resize(self):
        """The ``custom_fn_resize`` that makes clean-fid feed ``embed`` what ``prepare`` would (None: clean-fid's)."""
        return None


class InceptionExtractor(FeatureExtractor):
    """clean-fid's "clean" FID features (Heusel et al. 2017; Parmar et al. 2022): pool3, 2048-d.

    ``prepare`` resizes with clean-fid's own ``make_resizer("PIL", False, "bicubic", (299, 299))``
    (per-channel float PIL bicubic, no quantisation), the anti-aliased resize that
    clean-fid argues for; ``embed`` normalises (x - 128) / 128 and runs the network's
    ``layers``, as ``cleanfid.inception_torchscript.InceptionV3W`` does with ``resize_inside=False``.
    """

    name = "inception"
    label = "FID (Inception)"
    dim = 2048
    prepared_channels = 3

    def __init__(self, path: str | Path, in_channels: int):
        from cleanfid.resize import make_resizer  # clean-fid loads scipy, torchvision, requests: on use

        super().__init__(in_channels, f"{INCEPTION_FILE} sha256={file_sha256(path)} resize=clean-fid PIL bicubic 299")
        network = load_torchscript(path)
        if not hasattr(network, "layers"):
            raise fail("weights", str(path), f"is not clean-fid's {INCEPTION_FILE} (the TorchScript has no `layers`)")
        self.network = network
        self.resize = make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        arrays = images.cpu().numpy().transpose(0, 2, 3, 1)  # clean-fid resizes HWC numpy images
        if arrays.shape[-1] == 1:
            arrays = np.repeat(arrays, 3, axis=-1)  # what PIL's convert("RGB") does to clean-fid's grey files
        resized = np.stack([self.resize(a) for a in arrays])
        return torch.from_numpy(resized.transpose(0, 3, 1, 2).copy())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.network.layers((x - 128.0) / 128.0).reshape(len(x), self.dim)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "the inception extractor exposes only the 2048-d pool features: the TorchScript's classification"
            " output (1008-way, resized inside the network) is not part of the clean-FID path; an Inception Score"
            " is not computed here (extractor=inception_tf gives ADM's, or the classifier its analogue)"
        )


class InceptionTFExtractor(FeatureExtractor):
    """ADM's evaluator features (``sgexp.eval.adm_inception``): clean-fid's ``legacy_tensorflow`` mode.

    ``prepare`` only makes RGB floats (no resize: the network resizes inside, with TF1's bilinear
    resize as ADM's TensorFlow graph does); ``embed`` is the network pass, pool3 (2048-d).
    ``features_and_spatial`` adds sFID's ``mixed_6/conv`` features (first 7 channels, 17x17,
    2023-d) from the same pass; the Inception Score's logits are ``pool3 @ W`` without bias
    (``logits_from_features``), scored in splits of 5000 as ADM does. ``num_classes`` stays None:
    Inception's 1008 classes are not the dataset's labels (no class accuracy).
    """

    name = "inception_tf"
    label = "FID (Inception, ADM TF pipeline)"
    dim = 2048
    prepared_channels = 3
    spatial_dim = SPATIAL_DIM
    is_split_size = 5000  # ADM's compute_inception_score(split_size=5000): 10 splits at 50k samples

    def __init__(self, path: str | Path, in_channels: int):
        super().__init__(
            in_channels,
            f"{INCEPTION_FILE} sha256={file_sha256(path)} resize=TF1 bilinear inside the network (ADM, clean-fid"
            " legacy_tensorflow); pool3, mixed_6/conv[:7]",
        )
        self.network = load_adm_inception(path)  # fails here if the file's forward disagrees with our pass

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x  # PIL's convert("RGB") of a grey image

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)[0]

    def features_and_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_images(images)
        return self.network(self.prepare(images).to(self.device))

    def logits_from_features(self, features: np.ndarray) -> np.ndarray:
        return self.network.logits(features)

    def cleanfid_resize(self):
        return keep_size  # clean-fid's legacy_tensorflow mode does not resize either


class ClassifierExtractor(FeatureExtractor):
    """Domain features: the penultimate layer (128-d, post-ReLU) of the dataset's own SmallCNN."""

    name = "classifier"

    def __init__(self, path: str | Path, meta: dict):
        super().__init__(meta["channels"], f"{CHECKPOINT} sha256={file_sha256(path)}")
        self.network = load_classifier(path, meta)
        self.label = f"domain FID ({meta['name']} classifier)"
        self.dim = self.network.config.features
        self.num_classes = self.network.config.num_classes
        self.prepared_channels = meta["channels"]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()  # no resize: the classifier was trained at the dataset's resolution

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(normalise(x))[0]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_images(images)
        return self.network(normalise(images.to(self.device)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1]

    def cleanfid_resize(self):
        return keep_size


def keep_size(image: np.ndarray) -> np.ndarray:
    """clean-fid ``custom_fn_resize`` that leaves the image as it is (uint8 HWC; clean-fid scales it to 0..255)."""
    return image


class CleanFIDAdapter(nn.Module):
    """Our ``embed`` as clean-fid's ``custom_feat_extractor``.

    clean-fid opens every file with PIL ``convert("RGB")``, resizes it with its resizer
    (or ``custom_fn_resize``) and hands the model float NCHW batches in 0..255. For a
    grey extractor the three identical channels are reduced back to one.
    """

    def __init__(self, extractor: FeatureExtractor):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3 and self.extractor.prepared_channels == 1:
            x = x[:, :1]
        return self.extractor.embed(x.float())


# ----------------------------------------------------------------------------- Inception weights


def cleanfid_cache_dir() -> Path:
    """Where ``cleanfid.features.feature_extractor`` keeps (and downloads) the Inception file."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def inception_url() -> str:
    from cleanfid.downloads_helper import inception_url as url  # clean-fid loads scipy, torchvision, requests: on use

    return url


def inception_weights(weights: str | os.PathLike | None = None) -> Path:
    """Path of ``inception-2015-12-05.pt``; see the module docstring for the search order."""
    url = inception_url()
    where = (
        f"download {url} and pass its path as `weights` (evaluate: inception_weights=PATH),"
        f" set ${WEIGHTS_ENV}=PATH, or put it in clean-fid's cache {cleanfid_cache_dir() / INCEPTION_FILE}"
    )
    for source, value in (("weights", weights), (WEIGHTS_ENV, os.environ.get(WEIGHTS_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"{source}={str(value)!r}: no such file; it should be {INCEPTION_FILE}: {where}"
                )
            return path
    cached = cleanfid_cache_dir() / INCEPTION_FILE
    if cached.is_file():
        return cached
    if internet_reachable(url):
        from cleanfid.downloads_helper import (
            check_download_inception,
        )  # clean-fid loads scipy, torchvision, requests: on use

        log.info("downloading %s from %s into clean-fid's cache %s", INCEPTION_FILE, url, cached.parent)
        try:
            check_download_inception(fpath=str(cached.parent))
        except BaseException:
            cached.unlink(missing_ok=True)  # clean-fid writes in place: never leave a truncated file behind
            raise
        return cached
    raise FileNotFoundError(
        f"the Inception weights {INCEPTION_FILE} are missing and {urlparse(url).hostname} is unreachable"
        f" (offline): {where}"
    )


# ----------------------------------------------------------------------------- building


def build_extractor(
    name: str, dataset_dir: str | Path, device: str | torch.device = "cpu", weights: str | None = None
) -> FeatureExtractor:
    """The extractor ``name`` for images of the dataset at ``dataset_dir`` (which holds meta.json), in eval mode.

    ``weights`` is the Inception file (both Inception extractors) and is ignored by the classifier, which always
    loads ``<dataset_dir>/classifier.pt`` (so a caller may pass it unconditionally).
    For a latent dataset the extractor takes the decoded images (their channels are in
    meta.json), and the classifier is the one of the image dataset it was encoded from.
    Fails here, before any sampling, when weights are missing. ``auto``: see ``sgexp.eval.scoring``.
    """
    check_choice("name", name, (*EXTRACTORS, *ALIASES))
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    if name in ALIASES:
        if meta["name"] != "mnist5k":
            raise fail(
                "name",
                name,
                f"means the classifier of mnist5k, but {dataset_dir} holds {meta['name']!r}: use 'classifier'",
            )
        name = ALIASES[name]
    if name == "inception":
        extractor = InceptionExtractor(inception_weights(weights), image_channels(meta))
    elif name == "inception_tf":
        extractor = InceptionTFExtractor(inception_weights(weights), image_channels(meta))
    else:
        dataset_dir = image_dataset_dir(dataset_dir, meta)
        meta = read_meta(dataset_dir)
        path = dataset_dir / CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: train the domain classifier first with"
                f" `python -m sgexp.data classifier {meta['name']} --root {dataset_dir.parent}` (about a minute"
                " on 2 CPU cores for mnist5k), or use the inception extractor"
            )
        extractor = ClassifierExtractor(path, meta)
    return extractor.to(device).eval().requires_grad_(False)
