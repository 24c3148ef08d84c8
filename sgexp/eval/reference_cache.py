"""The reference side of every metric, computed once per (dataset, split, extractor) and cached.

The cache is ``<dataset_dir>/fid_stats/<extractor>_<split>.npz``: mu, sigma (and mu_s, sigma_s
for an extractor with spatial features), n, a random subset of raw features (for
precision/recall), the extractor's identity (a hash of its weights and its pipeline)
and the dataset's identity; a cache that does not match is recomputed. Files are written
atomically (a temporary file renamed over the old one), so concurrent readers never see half
of one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.data import BadSamples, read_meta
from sgexp.data.latent_format import image_dataset_dir
from sgexp.data.shards import shard_urls, split_pipeline
from sgexp.eval.features import FeatureExtractor
from sgexp.eval.metrics import PR_SEED, ReferenceStats, RunningMoments, extract_with_spatial
from sgexp.progress import track

log = logging.getLogger(__name__)

STATS_DIR = "fid_stats"


def stats_path(dataset_dir: str | Path, extractor_name: str, split: str) -> Path:
    return Path(dataset_dir) / STATS_DIR / f"{extractor_name}_{split}.npz"


def _dataset_identity(meta: dict, split: str) -> str:
    return f"{meta['name']} created={meta.get('created')} {split}={meta.get(f'num_{split}')}"


def _load(path: Path) -> ReferenceStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            strings = {key: str(z[key]) for key in ("extractor", "split", "dataset")}
            spatial = {key: z[key] for key in ("mu_s", "sigma_s") if key in z.files}
            return ReferenceStats(z["mu"], z["sigma"], z["features"], int(z["n"]), **strings, **spatial)
    except FileNotFoundError:
        return None
    except Exception as exn:  # a truncated or foreign file is recomputed, not trusted
        log.warning("ignoring unreadable reference statistics %s (%s: %s)", path, type(exn).__name__, exn)
        return None


def _save(stats: ReferenceStats, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # atomic: concurrent readers never see half a file
    with open(tmp, "wb") as f:
        np.savez(
            f,
            mu=stats.mu,
            sigma=stats.sigma,
            features=stats.features,
            n=stats.n,
            extractor=stats.extractor,
            split=stats.split,
            dataset=stats.dataset,
            **({} if stats.mu_s is None else {"mu_s": stats.mu_s, "sigma_s": stats.sigma_s}),
        )
    os.replace(tmp, path)


def _stale(cached: ReferenceStats, extractor: FeatureExtractor, dataset: str, max_features: int) -> str | None:
    """Why a cached file cannot be used, or None."""
    if cached.extractor != extractor.identity:
        return f"made by extractor {cached.extractor!r}, now {extractor.identity!r}"
    if cached.dataset != dataset:
        return f"made for dataset {cached.dataset!r}, now {dataset!r}"
    if len(cached.features) != min(max_features, cached.n):
        return f"holds {len(cached.features)} raw features, {min(max_features, cached.n)} asked"
    if extractor.spatial_dim and (cached.mu_s is None or cached.mu_s.shape != (extractor.spatial_dim,)):
        return f"has no {extractor.spatial_dim}-d spatial statistics (sFID)"
    return None


def _compute(
    extractor: FeatureExtractor, dataset_dir: Path, meta: dict, split: str, batch_size: int, max_features: int
) -> ReferenceStats:
    """One streaming pass over the split: running moments + a fixed random subset of raw features."""
    expected = meta[f"num_{split}"]
    keep = np.zeros(expected, dtype=bool)
    keep[np.random.default_rng(PR_SEED).choice(expected, min(max_features, expected), replace=False)] = True
    moments, subset, seen = RunningMoments(extractor.dim), [], 0
    spatial = RunningMoments(extractor.spatial_dim) if extractor.spatial_dim else None
    # strict reading: statistics over silently shortened data would be wrong without anyone noticing
    batches = split_pipeline(shard_urls(dataset_dir, meta, split), meta, batch_size, BadSamples(strict=True))
    with track(f"reference {meta['name']}/{split} ({extractor.name})", total=expected, unit="images") as advance:
        for images, _, _ in batches:
            feats, spatial_feats = extract_with_spatial(extractor, torch.from_numpy(images), batch_size)
            moments.update(feats)
            if spatial is not None:
                spatial.update(spatial_feats)
            subset.append(feats[keep[seen : seen + len(feats)]])
            seen += len(feats)
            advance(len(feats))
    if seen != expected or seen < 2:
        raise fail("dataset_dir", str(dataset_dir), f"the {split} split gave {seen} images, meta.json says {expected}")
    return ReferenceStats(
        moments.mean,
        moments.cov,
        np.concatenate(subset),
        seen,
        extractor.identity,
        split,
        _dataset_identity(meta, split),
        *((spatial.mean, spatial.cov) if spatial is not None else ()),
    )


def reference_stats(
    extractor: FeatureExtractor,
    dataset_dir: str | Path,
    split: str = "train",
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    max_features: int = 10000,
) -> ReferenceStats:
    """Statistics of the dataset's ``split`` under ``extractor``: from the cache, or computed once and cached.

    A latent dataset is scored against the real images it was encoded from (its image
    dataset, whose cache it shares), not against VAE reconstructions.
    """
    check_choice("split", split, ("train", "val"))
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_features", max_features)
    dataset_dir = Path(dataset_dir)
    dataset_dir = image_dataset_dir(dataset_dir, read_meta(dataset_dir))
    meta = read_meta(dataset_dir)
    dataset, path = _dataset_identity(meta, split), stats_path(dataset_dir, extractor.name, split)
    cached = _load(path)
    if cached is not None:
        why = _stale(cached, extractor, dataset, max_features)
        if why is None:
            log.info("reference statistics: %s (%d images)", path, cached.n)
            return cached
        log.info("cached reference statistics %s are stale (%s): recomputing", path, why)
    log.info(
        "computing reference statistics for %s/%s with the %s extractor (%d images; cached afterwards in %s)",
        meta["name"],
        split,
        extractor.name,
        meta[f"num_{split}"],
        path,
    )
    stats = _compute(extractor.to(device), dataset_dir, meta, split, batch_size, max_features)
    _save(stats, path)
    return stats
