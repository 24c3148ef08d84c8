"""Datasets as WebDataset shards: writers (``python -m sgexp.data prepare``) and readers.

Modules, each importing only those before it:

    prepare        image datasets -> shards + meta.json (mnist5k, digits, image folders)
    bad_samples    ShardError and the bad-sample counter every reader reports to
    latent_format  what a latent sample holds, and how it becomes model inputs
    shards         meta.json, the tar stages, the single-pass split reader (both formats)
    stream         the resumable training stream
    datamodule     the LightningDataModule over the stream and the split reader
    latents        image shards -> latent shards with ``sgexp.vae`` (``prepare latents``)

The readers are imported on first use: ``shards`` pulls in torch (~3 s) and
``datamodule`` lightning (~10 s), which ``python -m sgexp.data prepare`` on an
already prepared dataset should not pay.
"""

import importlib

from sgexp.data.bad_samples import BadSamples, ShardError
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
    "TrainStream": "sgexp.data.stream",
    "eval_dataset": "sgexp.data.shards",
    "read_meta": "sgexp.data.shards",
    "read_split": "sgexp.data.shards",
}

__all__ = [
    "DEFAULT_ROOT",
    "BadSamples",
    "ShardError",
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
