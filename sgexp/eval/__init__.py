"""Evaluation: feature extractors, the domain classifier, FID and friends, reference statistics.

    extractor = build_extractor("classifier", "data/shards/mnist5k")     # or "inception"
    ref = reference_stats(extractor, "data/shards/mnist5k", split="train")  # cached in fid_stats/
    metrics = compute_metrics(extractor, samples_uint8, labels, ref)     # fid, precision, recall, ...

Submodules are imported on first use (clean-fid pulls in scipy, torchvision and
requests), so ``import sgexp.eval`` stays cheap. ``sgexp.eval.sampling`` is
imported directly by its users.
"""

import importlib

_LAZY = {
    "FeatureExtractor": "sgexp.eval.features",
    "CleanFIDAdapter": "sgexp.eval.features",
    "auto_extractor_name": "sgexp.eval.features",
    "build_extractor": "sgexp.eval.features",
    "inception_weights": "sgexp.eval.features",
    "SmallCNN": "sgexp.eval.classifier",
    "train_classifier": "sgexp.eval.classifier",
    "ReferenceStats": "sgexp.eval.metrics",
    "class_accuracy": "sgexp.eval.metrics",
    "compute_metrics": "sgexp.eval.metrics",
    "extract": "sgexp.eval.metrics",
    "fid_from_features": "sgexp.eval.metrics",
    "inception_score": "sgexp.eval.metrics",
    "metrics_from_features": "sgexp.eval.metrics",
    "precision_recall": "sgexp.eval.metrics",
    "reference_stats": "sgexp.eval.metrics",
    "stats_path": "sgexp.eval.metrics",
    "load_reference_batch": "sgexp.eval.reference_batch",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
