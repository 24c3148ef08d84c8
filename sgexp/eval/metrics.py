"""Sample-quality metrics against a dataset's cached reference statistics.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge
  to a Local Nash Equilibrium"): the Fréchet distance between Gaussians fitted to
  the features of real and generated images,
  ``|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``. Computed as clean-fid
  does (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
  Evaluation"): float64 ``np.mean`` / ``np.cov`` and ``cleanfid.fid.frechet_distance``.
- sFID (Nash et al. 2021, "Generating Images with Sparse Representations"): the same
  distance on spatial features, ADM's first 7 channels of Inception's ``mixed_6/conv``
  (extractor ``inception_tf``), against the reference's ``mu_s``/``sigma_s``.
- Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
  Metric for Assessing Generative Models"), k = 3 nearest neighbours.
- Class accuracy: the fraction of samples the classifier assigns to the class they
  were generated for.
- Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs"):
  ``exp(E_x KL(p(y|x) || p(y)))``. ``inception_tf``: ADM's, softmax(pool3 @ W) in
  consecutive chunks of 5000 samples, the mean of the chunks' scores; the domain
  classifier: an analogue from its softmax over the whole sample set (one split).

The reference side is a ``ReferenceStats``; ``sgexp.eval.reference_cache`` computes and caches
it per (dataset, split, extractor).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from sgexp.checks import check_positive_int, fail
from sgexp.eval.features import FeatureExtractor
from sgexp.eval.manifolds import precision_recall

log = logging.getLogger("sgexp.eval.metrics")

PR_SEED = 0  # subsets drawn for precision/recall: fixed, so that two evaluations see the same real subset


# ----------------------------------------------------------------------------- FID


def fid_from_features(fake_feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FID of raw features against reference (mu, sigma), exactly as clean-fid computes it."""
    from cleanfid.fid import frechet_distance  # clean-fid and scipy load on use (slow imports)
    from scipy.linalg import LinAlgWarning

    fake_feats = np.asarray(fake_feats)
    if fake_feats.ndim != 2 or len(fake_feats) < 2:
        raise fail("fake_feats", f"shape {fake_feats.shape}", "FID needs a (N, dim) array with N >= 2")
    if fake_feats.shape[1] != len(mu_ref):
        raise fail("fake_feats", f"shape {fake_feats.shape}", f"reference statistics have dim {len(mu_ref)}")
    mu, sigma = np.mean(fake_feats, axis=0), np.cov(fake_feats, rowvar=False)  # float64, as clean-fid
    with warnings.catch_warnings():
        # clean-fid 0.1.35 calls scipy's sqrtm(..., disp=False), deprecated since scipy 1.16 (removal
        # announced for 1.18: constraints.txt pins scipy 1.17.1); the warning is not actionable here
        warnings.filterwarnings("ignore", message="The `disp` argument is deprecated", category=DeprecationWarning)
        # The classifier's post-ReLU features have dead units (~20 of 128 on mnist5k): both covariances
        # are exactly singular on those rows and sqrtm warns on every call. The result stays accurate
        # (it matches torchmetrics' eigenvalue route to ~1e-8, tests/test_eval_metrics.py), and
        # clean-fid itself still rejects non-finite or clearly complex square roots.
        warnings.filterwarnings("ignore", message="Matrix is singular", category=LinAlgWarning)
        return float(frechet_distance(mu, sigma, mu_ref, sigma_ref))


class RunningMoments:
    """Mean and covariance of a stream of feature batches in float64 (Chan et al.'s pairwise update).

    The reference split may not fit in memory as features (ImageNet: 1.28M x 2048);
    merging per-batch centred scatter matrices gives ``np.cov``'s result without
    the cancellation of the naive sum-of-squares formula.
    """

    def __init__(self, dim: int):
        self.n, self.mean, self.scatter = 0, np.zeros(dim), np.zeros((dim, dim))

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64)
        m, batch_mean = len(batch), batch.mean(axis=0)
        centred = batch - batch_mean
        delta, total = batch_mean - self.mean, self.n + m
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * m / total)
        self.mean += delta * (m / total)
        self.n = total

    @property
    def cov(self) -> np.ndarray:
        return self.scatter / (self.n - 1)


# ----------------------------------------------------------------------------- class metrics


def inception_score(probs: np.ndarray, split_size: int | None = None) -> float:
    """``exp(mean_x KL(p(y|x) || p(y)))`` with p(y) the mean prediction (Salimans et al. 2016).

    ``split_size``: ADM's evaluator (``compute_inception_score``): the score of each consecutive
    chunk of ``split_size`` rows (the last one may be shorter), then their mean; None: one split.
    1 when every sample gets the same prediction; num_classes when predictions are confident
    and the classes balanced. Unlike ADM's ``p * log p``, a probability of exactly 0 adds 0, not nan.
    """
    from scipy.special import rel_entr  # 0 * log 0 = 0, where a plain log would give nan

    probs = np.asarray(probs, dtype=np.float64)
    if split_size is not None:
        check_positive_int("split_size", split_size)
        return float(np.mean([inception_score(probs[i : i + split_size]) for i in range(0, len(probs), split_size)]))
    marginal = probs.mean(axis=0, keepdims=True)
    return float(np.exp(rel_entr(probs, marginal).sum(axis=1).mean()))


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples classified as the label they were generated for."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256, with_logits: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, dim) float32 and, if asked, logits (N, classes), batch by batch."""
    check_positive_int("batch_size", batch_size)
    extractor.check_images(images)
    feats, logits = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        f, z = extractor.features_and_logits(batch) if with_logits else (extractor(batch), None)
        feats.append(f.float().cpu().numpy())
        if with_logits:
            logits.append(z.float().cpu().numpy())
    if not feats:
        return np.zeros((0, extractor.dim), np.float32), None
    return np.concatenate(feats), (np.concatenate(logits) if with_logits else None)


@torch.no_grad()
def extract_with_spatial(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (N, dim) and, if the extractor has them, spatial features (N, spatial_dim): one pass."""
    if not extractor.spatial_dim:
        return extract(extractor, images, batch_size)[0], None
    check_positive_int("batch_size", batch_size)
    extractor.check_images(images)
    parts = [extractor.features_and_spatial(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    if not parts:
        return np.zeros((0, extractor.dim), np.float32), np.zeros((0, extractor.spatial_dim), np.float32)
    return tuple(np.concatenate([p[k].float().cpu().numpy() for p in parts]) for k in (0, 1))


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (dim,) float64
    sigma: np.ndarray  # (dim, dim) float64
    features: np.ndarray  # (<= max_features, dim) float32, a uniform random subset of the split
    n: int  # images the statistics were computed on
    extractor: str  # FeatureExtractor.identity: which weights made the features
    split: str
    dataset: str = ""  # dataset identity (name, creation time, size): a re-prepared dataset invalidates the cache
    mu_s: np.ndarray | None = None  # (spatial_dim,) sFID's spatial statistics; None when the extractor has none
    sigma_s: np.ndarray | None = None  # (spatial_dim, spatial_dim)


# ----------------------------------------------------------------------------- all metrics


def _check_labels(labels, n: int) -> None:
    if labels is not None and (np.ndim(labels) != 1 or len(labels) != n):
        raise fail("labels", f"shape {tuple(np.shape(labels))}", f"must be one label per image ({n})")


def pr_reference(ref: ReferenceStats, n: int) -> np.ndarray:
    """The reference features precision/recall of ``n`` samples compare with: as many as there are
    samples (k-NN radii shrink as a set grows), the same ``PR_SEED`` subset in every evaluation."""
    real = ref.features
    if len(real) > n:
        real = real[np.sort(np.random.default_rng(PR_SEED).choice(len(real), n, replace=False))]
    return real


def metrics_from_features(
    features: np.ndarray,
    logits: np.ndarray | None,
    labels: np.ndarray | None,
    ref: ReferenceStats,
    spatial: np.ndarray | None = None,
    is_split_size: int | None = None,
) -> dict:
    """``compute_metrics`` on features (and logits) already extracted, e.g. gathered from several processes.

    Keys: ``fid``, ``precision``, ``recall``, ``num_samples``; with ``spatial`` features also
    ``sfid`` (against ``ref.mu_s``/``ref.sigma_s``; nan if the reference has none); with
    ``logits`` also ``inception_score`` (chunks of ``is_split_size``, see ``inception_score``)
    and, when ``labels`` are given, ``class_accuracy``. Precision and recall use as many
    reference features as there are samples (``PR_SEED`` subset; see ``precision_recall``),
    and are nan below k + 1 = 4 samples.
    """
    n = len(features)
    _check_labels(labels, n)
    if spatial is not None and len(spatial) != n:
        raise fail("spatial", f"shape {np.shape(spatial)}", f"must be one row per sample ({n})")
    metrics = {"fid": fid_from_features(features, ref.mu, ref.sigma)}
    if spatial is not None:
        if ref.mu_s is None:
            log.warning("the reference statistics have no spatial part (mu_s, sigma_s): sFID reported as nan")
            metrics["sfid"] = float("nan")
        else:
            metrics["sfid"] = fid_from_features(spatial, ref.mu_s, ref.sigma_s)
    real = pr_reference(ref, n)
    if min(len(real), n) > 3:
        metrics["precision"], metrics["recall"] = precision_recall(real, features, k=3)
    else:
        log.warning(
            "precision/recall need more than 3 samples and reference features, got %d and %d: reported as nan",
            n,
            len(real),
        )
        metrics["precision"] = metrics["recall"] = float("nan")
    if logits is not None:
        probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()
        metrics["inception_score"] = inception_score(probs, is_split_size)
        if labels is not None:
            metrics["class_accuracy"] = class_accuracy(logits, labels)
    metrics["num_samples"] = n
    return metrics


def score_features(
    extractor: FeatureExtractor,
    features: np.ndarray,
    logits: np.ndarray | None,
    labels: np.ndarray | None,
    ref: ReferenceStats,
    spatial: np.ndarray | None = None,
) -> dict:
    """``metrics_from_features`` as ``extractor`` defines its metrics: Inception-Score logits from the
    features where they come from them (ADM: pool3 @ W), its split size, class accuracy only when its
    classes are the dataset's (``num_classes``)."""
    if logits is None:
        logits = extractor.logits_from_features(features)
    labels = labels if extractor.num_classes is not None else None
    return metrics_from_features(features, logits, labels, ref, spatial, extractor.is_split_size)


def compute_metrics(
    extractor: FeatureExtractor,
    fake_images_uint8: torch.Tensor,
    labels: torch.Tensor | None,
    ref: ReferenceStats,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """FID, precision, recall; for a classifier the IS analogue and class accuracy (if ``labels``);
    for ``inception_tf`` sFID and ADM's Inception Score.

    See ``metrics_from_features`` for the keys. ``ref`` must come from the same
    weights as ``extractor`` (``reference_stats`` with this extractor).
    """
    if ref.extractor != extractor.identity:
        raise fail(
            "ref",
            ref.extractor,
            f"was computed with other weights than this extractor ({extractor.identity})"
            "; get fresh statistics from reference_stats",
        )
    _check_labels(labels, len(fake_images_uint8))  # before the (possibly long) feature extraction
    extractor = extractor.to(device)
    spatial = None
    if extractor.num_classes is not None:
        features, logits = extract(extractor, fake_images_uint8, batch_size, with_logits=True)
    else:
        (features, spatial), logits = extract_with_spatial(extractor, fake_images_uint8, batch_size), None
    labels = None if labels is None else torch.as_tensor(labels).cpu().numpy()
    return score_features(extractor, features, logits, labels, ref, spatial)
