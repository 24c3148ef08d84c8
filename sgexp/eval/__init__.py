"""Evaluation: feature extractors, the domain classifier, FID and friends, reference statistics.

    extractor = build_extractor("classifier", "data/shards/mnist5k")     # or "inception", "inception_tf"
    ref = reference_stats(extractor, "data/shards/mnist5k", split="train")  # cached in fid_stats/
    metrics = compute_metrics(extractor, samples_uint8, labels, ref)     # fid, precision, recall, (sfid) ...

Modules, each importing only those before it:

    classifier       the domain-FID classifier (train with ``python -m sgexp.data classifier DATASET``)
    progress         samples/s and ETA of every sampling and feature pass (lines when not a terminal)
    adm_inception    ADM's TensorFlow Inception pipeline on clean-fid's weights (pool3, mixed_6/conv, logits)
    features         Inception (clean-fid, ADM's TF pipeline) and classifier feature extractors
    manifolds        k-NN precision and recall (and the per-sample indicators the bootstrap resamples)
    metrics          FID, sFID, IS, class accuracy, cached reference statistics, all metrics of a feature set
    bootstrap        intervals over sample indices, paired across settings scored on the same indices
    reference_batch  an ADM reference npz as reference statistics
    scoring          which extractor, reference and decoder score a dataset (``auto``), loaded once
    export           a setting's samples as an ADM-evaluator npz (streamed per rank, merged in index order)
    sampling         generate and score one guidance setting on one process or many
    settings         config mappings of guidance settings -> validated ``Setting``s
    evaluator        a checkpoint's EMA model(s) + scoring: ``load_evaluator`` (sgexp.evaluate, sweeps)

Names below are imported on first use (clean-fid pulls in scipy, torchvision and
requests), so ``import sgexp.eval`` stays cheap; the modules are imported directly too.
"""

import importlib

_LAZY = {
    "FeatureExtractor": "sgexp.eval.features",
    "CleanFIDAdapter": "sgexp.eval.features",
    "build_extractor": "sgexp.eval.features",
    "inception_weights": "sgexp.eval.features",
    "load_adm_inception": "sgexp.eval.adm_inception",
    "SmallCNN": "sgexp.eval.classifier",
    "train_classifier": "sgexp.eval.classifier",
    "ReferenceStats": "sgexp.eval.metrics",
    "class_accuracy": "sgexp.eval.metrics",
    "compute_metrics": "sgexp.eval.metrics",
    "extract": "sgexp.eval.metrics",
    "extract_with_spatial": "sgexp.eval.metrics",
    "fid_from_features": "sgexp.eval.metrics",
    "inception_score": "sgexp.eval.metrics",
    "metrics_from_features": "sgexp.eval.metrics",
    "precision_recall": "sgexp.eval.manifolds",
    "reference_stats": "sgexp.eval.reference_cache",
    "score_features": "sgexp.eval.metrics",
    "stats_path": "sgexp.eval.reference_cache",
    "load_reference_batch": "sgexp.eval.reference_batch",
    "Scoring": "sgexp.eval.scoring",
    "choose_extractor": "sgexp.eval.scoring",
    "load_scoring": "sgexp.eval.scoring",
    "make_settings": "sgexp.eval.settings",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
