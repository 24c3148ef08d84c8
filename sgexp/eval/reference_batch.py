"""Reference statistics from an ADM reference batch, e.g. ``VIRTUAL_imagenet256_labeled.npz``.

The evaluation suite of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on
Image Synthesis"; ``guided-diffusion/evaluations``), which the SG paper uses for
FID-50k, ships one npz per dataset with

- ``mu`` (2048,) and ``sigma`` (2048, 2048): the Inception pool_3 feature statistics of
  the whole training set (ImageNet-256: 1.28M images), the FID reference;
- ``mu_s`` (2023,) and ``sigma_s``: the same for sFID's spatial features (the first 7
  channels of ``mixed_6/conv``, 17x17);
- ``arr_0`` (N, H, W, 3) uint8: a reference sample (10,000 images), used here for
  precision and recall (its features are computed with the extractor, as ADM does).

Those statistics come from ADM's TensorFlow pipeline (resize inside the graph), so only
the ``inception_tf`` extractor (``protocol=adm``), which computes our samples' features
the same way, may be compared with them; the ``inception`` extractor (clean-fid's
anti-aliased resize outside the network) is refused with an error naming both, as a
mixed FID would be neither clean-fid's nor ADM's number. Reports say which reference was
used (``reference`` in results.json).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from sgexp.checks import check_positive_int, fail
from sgexp.eval.features import FeatureExtractor
from sgexp.eval.metrics import PR_SEED, ReferenceStats, extract
from sgexp.progress import track

log = logging.getLogger(__name__)

SPLIT = "reference_batch"
EXTRACTOR = "inception_tf"  # the pipeline the statistics come from


def _moments(z, path: Path, names: tuple[str, str], dim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = z[names[0]].astype(np.float64), z[names[1]].astype(np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise fail(
            "reference_batch",
            str(path),
            f"{names[0]} {mu.shape} and {names[1]} {sigma.shape} must be ({dim},) and ({dim}, {dim}) for {what}",
        )
    return mu, sigma


def _identity(path: Path, mu: np.ndarray, sigma: np.ndarray) -> str:
    """Names the statistics by content, so that a renamed copy is still recognised."""
    digest = hashlib.sha256(np.ascontiguousarray(mu).tobytes() + np.ascontiguousarray(sigma).tobytes())
    return f"ADM reference batch {path.name} sha256(mu, sigma)={digest.hexdigest()[:16]}"


def load_reference_batch(
    path: str | Path,
    extractor: FeatureExtractor,
    max_features: int = 10000,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> ReferenceStats:
    """``ReferenceStats`` with the npz's ``mu``/``sigma`` (and ``mu_s``/``sigma_s``: sFID; without them
    sFID is nan) and ``extractor`` features of up to ``max_features`` of its ``arr_0`` images (none
    without ``arr_0``: precision and recall are then nan). ``extractor`` must be ``inception_tf``."""
    check_positive_int("max_features", max_features)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference_batch={str(path)!r}: no such file; ADM's ImageNet-256 batch is VIRTUAL_imagenet256_labeled.npz"
            " from the guided-diffusion evaluation suite (openai/guided-diffusion, evaluations/README.md)"
        )
    if extractor.name == "inception":
        raise fail(
            "reference_batch",
            str(path),
            "holds statistics of ADM's TensorFlow Inception pipeline (resize inside the network), but"
            " extractor='inception' is clean-fid's clean resize: the FID would mix two pipelines;"
            f" use extractor={EXTRACTOR} (protocol=adm)",
        )
    if extractor.name != EXTRACTOR:
        raise fail(
            "reference_batch",
            str(path),
            f"holds Inception statistics of ADM's pipeline; the extractor is {extractor.name!r}: use {EXTRACTOR}",
        )
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise fail("reference_batch", str(path), f"has no {missing} (arrays found: {z.files})")
        dim = extractor.dim
        mu, sigma = _moments(z, path, ("mu", "sigma"), dim, f"the {extractor.name} extractor")
        mu_s = sigma_s = None
        if "mu_s" in z.files and "sigma_s" in z.files:
            mu_s, sigma_s = _moments(z, path, ("mu_s", "sigma_s"), extractor.spatial_dim, "sFID's spatial features")
        else:
            log.warning("reference batch %s has no mu_s/sigma_s: sFID is not computed (nan)", path)
        images = z["arr_0"] if "arr_0" in z.files else None
    features = np.zeros((0, dim), np.float32)
    if images is not None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise fail("reference_batch", str(path), f"arr_0 is {images.dtype} {images.shape}, not uint8 (N, H, W, 3)")
        keep = np.sort(np.random.default_rng(PR_SEED).permutation(len(images))[: min(max_features, len(images))])
        log.info("reference batch %s: Inception features of %d of its images (precision/recall)", path, len(keep))
        extractor, chunks = extractor.to(device), []
        with track(f"reference batch {path.name} ({extractor.name})", len(keep), "images") as advance:
            for start in range(0, len(keep), batch_size):  # a batch at a time: no second full-size copy
                part = images[keep[start : start + batch_size]].transpose(0, 3, 1, 2)  # (B, 3, H, W)
                chunks.append(extract(extractor, torch.from_numpy(np.ascontiguousarray(part)), batch_size)[0])
                advance(len(part))
        features = np.concatenate(chunks)
    else:
        log.warning("reference batch %s has no arr_0 images: precision and recall are not computed", path)
    identity = _identity(path, mu, sigma)
    return ReferenceStats(mu, sigma, features, len(features), extractor.identity, SPLIT, identity, mu_s, sigma_s)
