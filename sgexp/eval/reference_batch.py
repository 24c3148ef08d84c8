"""Reference statistics from an ADM reference batch, e.g. ``VIRTUAL_imagenet256_labeled.npz``.

The evaluation suite of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on
Image Synthesis"; ``guided-diffusion/evaluations``), which the SG paper uses for
FID-50k, ships one npz per dataset with

- ``mu`` (2048,) and ``sigma`` (2048, 2048): the Inception pool_3 feature statistics of
  the whole training set (ImageNet-256: 1.28M images), the FID reference;
- ``arr_0`` (N, H, W, 3) uint8: a reference sample (10,000 images), used here for
  precision and recall; ``mu_s``/``sigma_s`` (sFID's spatial features) are not used.

The statistics come from the same Inception weights as clean-fid's
``inception-2015-12-05.pt``, but ADM resizes inside TensorFlow, not with clean-fid's
anti-aliased resize; for 256px images the two FIDs are close but not identical.
Reports say which reference was used (``reference`` in results.json).
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

log = logging.getLogger(__name__)

SPLIT = "reference_batch"


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
    """``ReferenceStats`` with the npz's ``mu``/``sigma`` and ``extractor`` features of up to
    ``max_features`` of its ``arr_0`` images (none without ``arr_0``: precision and recall are then nan)."""
    check_positive_int("max_features", max_features)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"reference_batch={str(path)!r}: no such file; ADM's ImageNet-256 batch is VIRTUAL_imagenet256_labeled.npz"
            " from the guided-diffusion evaluation suite (openai/guided-diffusion, evaluations/README.md)"
        )
    if extractor.name != "inception":
        raise fail("reference_batch", str(path), f"holds Inception statistics; the extractor is {extractor.name!r}")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise fail("reference_batch", str(path), f"has no {missing} (arrays found: {z.files})")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        dim = extractor.dim
        if mu.shape != (dim,) or sigma.shape != (dim, dim):
            raise fail(
                "reference_batch",
                str(path),
                f"mu {mu.shape} and sigma {sigma.shape} must be ({dim},) and ({dim}, {dim}) for the {extractor.name}"
                " extractor",
            )
        images = z["arr_0"] if "arr_0" in z.files else None
    features = np.zeros((0, dim), np.float32)
    if images is not None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise fail("reference_batch", str(path), f"arr_0 is {images.dtype} {images.shape}, not uint8 (N, H, W, 3)")
        keep = np.sort(np.random.default_rng(PR_SEED).permutation(len(images))[: min(max_features, len(images))])
        log.info("reference batch %s: Inception features of %d of its images (precision/recall)", path, len(keep))
        batch = torch.from_numpy(np.ascontiguousarray(images[keep].transpose(0, 3, 1, 2)))  # (N, 3, H, W)
        features, _ = extract(extractor.to(device), batch, batch_size)
    else:
        log.warning("reference batch %s has no arr_0 images: precision and recall are not computed", path)
    return ReferenceStats(mu, sigma, features, len(features), extractor.identity, SPLIT, _identity(path, mu, sigma))
