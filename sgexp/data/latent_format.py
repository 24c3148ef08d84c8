"""The latent sample format: what a latent shard holds and how a reader turns it into model inputs.

A latent dataset (written by ``python -m sgexp.data prepare latents``) mirrors an image
dataset shard for shard. A sample is::

    {"__key__": source key, "cls": label,
     "mean.npy": (V, C, h, w), "std.npy": (V, C, h, w)}     # the VAE posterior, unscaled, meta's dtype

with view 0 the image and view 1 (when prepared with ``--flip``) its mirror image,
encoded separately: the latent of a flipped image is not the flipped latent.
meta.json says ``"format": "latent"`` and records the autoencoder (``vae``), the
scale and shift (``latent``), and the image dataset it came from (``images``);
``channels`` and ``resolution`` are the latents' (4 and 32 for ImageNet-256), so a
model built from meta.json is built for latents without knowing it.

Readers turn a sample into ``scale · (mean + std·ε − shift)`` for training, with
ε drawn from the seed the training stream gives each slot (``stream.Window.plan``:
a resumed stream draws the same ε), and into ``scale · (mean − shift)`` for validation.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from sgexp.checks import fail
from sgexp.data.bad_samples import BadSamples, ShardError

FORMAT = "latent"
FIELDS = ("mean.npy", "std.npy")
VIEWS = ("image", "hflip")
DTYPES = ("float16", "float32")


def is_latent(meta: dict) -> bool:
    return meta.get("format") == FORMAT


def sample_fields(meta: dict) -> tuple[str, ...]:
    """The tar members every sample of this dataset must have, besides ``cls``."""
    return FIELDS if is_latent(meta) else ("png",)


def image_channels(meta: dict) -> int:
    """Channels of the images a model for this dataset produces (after decoding, for latents)."""
    return int(meta["images"]["channels"]) if is_latent(meta) else int(meta["channels"])


def image_dataset_dir(dataset_dir: str | Path, meta: dict) -> Path:
    """The prepared image dataset behind ``dataset_dir``: itself for images, the encoded one for latents.

    Looks where meta.json says first, then next to the latent dataset (a data root
    copied to another machine keeps its layout). Fails naming both places.
    """
    if not is_latent(meta):
        return Path(dataset_dir)
    recorded = Path(meta["images"]["dataset"])
    sibling = Path(dataset_dir).parent / meta["images"]["name"]
    for candidate in (recorded, sibling):
        if (candidate / "meta.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"the image dataset of the latent dataset {dataset_dir} is missing (looked in {recorded} and {sibling}):"
        " reference statistics and the domain classifier need the images; copy that dataset there,"
        " or use a precomputed reference batch (reference_batch=PATH/VIRTUAL_imagenet256_labeled.npz)"
    )


def encode_array(array: np.ndarray) -> bytes:
    """``np.save`` bytes (no pickle): a few bytes of header, then the raw array."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- reader stages


def decode_latents(batches: Iterable[list[dict]], meta: dict, bad: BadSamples, patience: int = 100) -> Iterator[tuple]:
    """Lists of raw samples -> (float32 (B, 2, C, h, w) [mean, std], int64 labels, keys[, noise seeds]).

    The view is the flipped one where the sample's flip bit is set. Noise seeds are
    passed on (a 4th element) when the samples carry them (the training stream).
    Samples that do not match meta.json are reported to ``bad`` and dropped.
    """
    views, dtype = len(meta["latent"]["views"]), meta["latent"]["dtype"]
    want = (views, meta["channels"], meta["resolution"], meta["resolution"])
    empty = 0
    for batch in batches:
        moments, labels, keys, seeds = [], [], [], []
        for sample in batch:
            try:
                mean, std = (decode_array(sample["fields"][name]) for name in FIELDS)
                for array in (mean, std):
                    if array.shape != want or array.dtype != np.dtype(dtype):
                        raise ValueError(f"latent is {array.dtype} {array.shape}, meta.json says {dtype} {want}")
            except Exception as exn:
                bad.report(sample["url"], f"sample {sample['key']}: cannot decode ({type(exn).__name__}: {exn})")
                continue
            view = 1 if sample["flip"] else 0
            moments.append(np.stack([mean[view], std[view]]))
            labels.append(sample["label"])
            keys.append(sample["key"])
            seeds.append(sample.get("noise_seed"))
        if moments:
            empty = 0
            out = (np.stack(moments).astype(np.float32), np.asarray(labels, dtype=np.int64), keys)
            yield (*out, seeds) if seeds[0] is not None else out
        elif (empty := empty + 1) >= patience:
            raise ShardError(f"no decodable latent in {patience} batches in a row (last shard {batch[-1]['url']})")


def latents_for_model(batches: Iterable[tuple], meta: dict, return_keys: bool = False) -> Iterator[tuple]:
    """Decoded batches -> (float32 (B, C, h, w) model latents, int64 labels).

    With noise seeds: ``scale · (mean + std·ε − shift)``, ε ~ N(0, I) from each sample's
    seed; without: the posterior mean ``scale · (mean − shift)`` (validation).
    """
    scale, shift = float(meta["latent"]["scale"]), float(meta["latent"]["shift"])
    for moments, labels, keys, *rest in batches:
        mean, std = torch.from_numpy(moments[:, 0]), torch.from_numpy(moments[:, 1])
        if rest:
            shape = mean.shape[1:]  # (C, h, w)
            eps = [torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in rest[0]]
            mean = mean + std * torch.stack(eps)
        batch = ((mean - shift) * scale, torch.from_numpy(labels))
        yield (*batch, keys) if return_keys else batch


def check_hflip(meta: dict, hflip: bool, where: str) -> None:
    """Flipping latents needs the mirror image's latents: flipping the latent array is not the same."""
    if hflip and is_latent(meta) and "hflip" not in meta["latent"]["views"]:
        raise fail(
            "hflip",
            hflip,
            f"{where} stores no latents of flipped images (it was prepared without --flip):"
            " prepare it again with `python -m sgexp.data prepare latents ... --flip`, or set data.hflip=false",
        )


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise fail("dtype", dtype, f"must be one of {list(DTYPES)} (how the posterior mean and std are stored)")
    return dtype
