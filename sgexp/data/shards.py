"""Reading shards: meta.json, pipeline stages, a single-pass split reader.

The training stream (``stream.TrainStream``) reads shards with the stages here:

    tar samples (``_tar_samples``: open, expand, group by key, completeness check)
      ->  field check (``_check``)  ->  PNG decode (``_decoded``) or latent decode (``latent_format``)
      ->  model inputs (``_for_model`` / ``latent_format.latents_for_model``)

Evaluation reads each split once, in shard order, shards split over ranks then
workers, so no sample is read twice. Bad samples go to ``bad_samples.BadSamples``
(counted and skipped, or ``ShardError`` in strict mode).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, url_opener

from sgexp.checks import check_choice
from sgexp.data import latent_format
from sgexp.data.bad_samples import BadSamples, ShardError
from sgexp.data.prepare import BUILTIN

# ----------------------------------------------------------------------------- metadata


def read_meta(root: str | Path) -> dict:
    """meta.json of a prepared dataset directory; a missing one says how to make it."""
    path = Path(root) / "meta.json"
    if not path.exists():
        name = Path(root).name if Path(root).name in BUILTIN else "<name>"
        raise FileNotFoundError(
            f"{path} does not exist: run `python -m sgexp.data prepare {name}` first"
            " (mnist5k, digits, or folder PATH --resolution R); shards without meta.json"
            " are left by an interrupted prepare, run it again"
        )
    return json.loads(path.read_text())


def shard_urls(root: str | Path, meta: dict, split: str) -> list[str]:
    return [str(Path(root).resolve() / name) for name in meta[f"{split}_shards"]]


# ----------------------------------------------------------------------------- pipeline stages


def _whole_shards(files: Iterable[dict], expected: dict[str, int], bad: BadSamples) -> Iterator[dict]:
    """Pass tar members through, reporting shards that end early *without* an error.

    tarfile stops silently at a truncation on a header boundary (a copy cut at a
    4 KiB block often is) and at a damaged header; meta.json knows how many
    samples each shard holds. Errors raised mid-shard reach ``bad`` directly.
    """
    url, samples, last_key = None, 0, None
    for file in files:
        if file == {}:  # webdataset's end-of-shard marker: tarfile finished the shard cleanly
            want = expected.get(Path(url).name) if url else None
            if want is not None and samples != want:
                bad.report(url, f"ends after {samples} of {want} samples (truncated or damaged tar)")
            url, samples, last_key = None, 0, None
        else:
            if file["__url__"] != url:  # the previous shard ended in an error, already reported
                url, samples, last_key = file["__url__"], 0, None
            key = base_plus_ext(file["fname"])[0]
            if key != last_key:
                samples, last_key = samples + 1, key
        yield file


def _tar_samples(meta: dict, bad: BadSamples) -> list:
    """``wds.tarfile_to_samples`` (open, expand, group by key) with the completeness check inside."""
    return [
        partial(url_opener, handler=bad),
        partial(tar_file_expander, handler=bad),
        partial(_whole_shards, expected=meta.get("shard_samples", {}), bad=bad),
        partial(group_by_keys, handler=bad),
    ]


def _check(sample: dict, meta: dict, bad: BadSamples) -> dict | None:
    """The sample with the format's fields (PNG, or latent mean and std) and a valid label, else None.

    Cheap (no decoding), so it runs before any batch is skipped.
    """
    url, key = sample.get("__url__", "<unknown shard>"), sample.get("__key__")
    try:
        label = int(sample["cls"])
        if not 0 <= label < meta["num_classes"]:
            raise ValueError(f"label {label} outside [0, {meta['num_classes']})")
        fields = {name: sample[name] for name in latent_format.sample_fields(meta)}
    except (KeyError, ValueError) as exn:
        bad.report(url, f"sample {key}: missing or invalid field ({type(exn).__name__}: {exn})")
        return None
    return {"key": key, "url": url, "fields": fields, "label": label, "flip": False}


def _checked(samples: Iterable[dict], meta: dict, bad: BadSamples) -> Iterator[dict]:
    """The samples that pass ``_check``."""
    for sample in samples:
        if (checked := _check(sample, meta, bad)) is not None:
            yield checked


def _decoded(
    batches: Iterable[list[dict]], channels: int, resolution: int, bad: BadSamples, patience: int = 100
) -> Iterator[tuple]:
    """Lists of raw samples -> (uint8 N x C x R x R, int64 labels, keys); undecodable samples are dropped.

    ``patience`` batches in a row without one decodable image raise: the data do
    not match meta.json, and skipping forever would look like a hang.
    """
    empty = 0
    for batch in batches:
        images, labels, keys = [], [], []
        for sample in batch:
            try:
                with Image.open(io.BytesIO(sample["fields"]["png"])) as image:
                    array = np.asarray(image)
                want = (resolution, resolution) if channels == 1 else (resolution, resolution, channels)
                if array.shape != want or array.dtype != np.uint8:
                    raise ValueError(f"image is {array.dtype} {array.shape}, meta.json says uint8 {want}")
            except Exception as exn:
                bad.report(sample["url"], f"sample {sample['key']}: cannot decode ({type(exn).__name__}: {exn})")
                continue
            array = array[None] if channels == 1 else array.transpose(2, 0, 1)
            images.append(array[..., ::-1] if sample["flip"] else array)
            labels.append(sample["label"])
            keys.append(sample["key"])
        if images:
            empty = 0
            yield np.stack(images), np.asarray(labels, dtype=np.int64), keys
        elif (empty := empty + 1) >= patience:
            raise ShardError(f"no decodable image in {patience} batches in a row (last shard {batch[-1]['url']})")


def _for_model(batches: Iterable[tuple], return_keys: bool = False) -> Iterator[tuple]:
    """uint8 v -> float32 v / 127.5 - 1 in [-1, 1]; labels int64."""
    for images, labels, keys in batches:
        batch = (torch.from_numpy(images).float() / 127.5 - 1.0, torch.from_numpy(labels))
        yield (*batch, keys) if return_keys else batch


def _decode_stage(meta: dict, bad: BadSamples):
    """Raw sample lists -> arrays, for the dataset's format (meta.json's word)."""
    if latent_format.is_latent(meta):
        return partial(latent_format.decode_latents, meta=meta, bad=bad)
    return partial(_decoded, channels=meta["channels"], resolution=meta["resolution"], bad=bad)


def _model_stage(meta: dict, return_keys: bool = False):
    """Arrays -> model inputs: images in [-1, 1], or scaled latents."""
    if latent_format.is_latent(meta):
        return partial(latent_format.latents_for_model, meta=meta, return_keys=return_keys)
    return partial(_for_model, return_keys=return_keys)


def split_by_rank(src: Iterable, rank: int, world_size: int) -> Iterator:
    """``wds.split_by_node`` with the rank passed in: a worker started with spawn or
    forkserver does not see the process group, and would silently read every shard."""
    return islice(src, rank, None, world_size)


# ----------------------------------------------------------------------------- evaluation


def split_pipeline(
    urls: list[str], meta: dict, batch_size: int, bad: BadSamples, rank: int = 0, world_size: int = 1
) -> wds.DataPipeline:
    """One ordered pass over a split; yields (uint8 images, int64 labels, keys), last batch partial.

    For a latent dataset the first element is float32 (B, 2, C, h, w): the stored
    posterior [mean, std], unscaled.
    """
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        partial(split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        _tar_samples(meta, bad),
        partial(_checked, meta=meta, bad=bad),
        wds.batched(batch_size, collation_fn=None, partial=True),
        _decode_stage(meta, bad),
    )


def eval_dataset(
    urls: list[str],
    meta: dict,
    batch_size: int,
    bad: BadSamples,
    rank: int = 0,
    world_size: int = 1,
    return_keys: bool = False,
) -> wds.DataPipeline:
    """``split_pipeline`` as model batches ``(images in [-1, 1], labels)`` (+ keys, for tests).

    Latent datasets give the posterior mean, scaled: validation is deterministic.
    """
    pipeline = split_pipeline(urls, meta, batch_size, bad, rank, world_size)
    return pipeline.compose(_model_stage(meta, return_keys))


def read_split(root: str | Path, split: str = "val", strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: (uint8 N x C x R x R, int64 N), in shard order.

    For reference statistics and tests. Strict by default: reference statistics
    over silently shortened data would be wrong without anyone noticing.
    Latent datasets give float32 (N, 2, C, h, w): the stored posterior [mean, std].
    """
    check_choice("split", split, ("train", "val"))
    meta = read_meta(root)
    batches = list(split_pipeline(shard_urls(root, meta, split), meta, 1024, BadSamples(strict)))
    if not batches:
        c, r = meta["channels"], meta["resolution"]
        if latent_format.is_latent(meta):
            return torch.zeros(0, 2, c, r, r), torch.zeros(0, dtype=torch.int64)
        return torch.zeros(0, c, r, r, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    images = torch.from_numpy(np.concatenate([b[0] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b[1] for b in batches]))
    return images, labels
