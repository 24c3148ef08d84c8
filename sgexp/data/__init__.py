"""Datasets as WebDataset shards: writers (``python -m sgexp.data prepare``) and readers.

The readers are imported on first use: ``shards`` pulls in torch (~3 s) and
``datamodule`` lightning (~10 s), which ``python -m sgexp.data prepare`` on an
already prepared dataset should not pay; ``prepare_latents`` (``latents``) needs
diffusers, which nothing else does.
"""

import importlib

from sgexp.data.prepare import (
    DEFAULT_ROOT,
    center_crop,
    ensure_prepared,
    prepare_digits,
    prepare_folder,
    prepare_mnist5k,
    stratified_split,
)

_LAZY = {
    "ShardDataModule": "sgexp.data.datamodule",
    "prepare_latents": "sgexp.data.latents",
    "BadSamples": "sgexp.data.shards",
    "ShardError": "sgexp.data.shards",
    "TrainStream": "sgexp.data.stream",
    "eval_dataset": "sgexp.data.shards",
    "read_meta": "sgexp.data.shards",
    "read_split": "sgexp.data.shards",
}

__all__ = [
    "DEFAULT_ROOT",
    "center_crop",
    "ensure_prepared",
    "prepare_digits",
    "prepare_folder",
    "prepare_mnist5k",
    "stratified_split",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
