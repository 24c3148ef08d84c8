"""``prepare latents``: encode a prepared image dataset with an SD-VAE into latent shards.

    python -m sgexp.data prepare latents --images data/shards/imagenet256 --vae models/sd-vae-ft-ema --flip
    torchrun --nproc_per_node 8 -m sgexp.data prepare latents --images ... --vae ...   # one GPU per rank

The output mirrors the image dataset shard for shard (same names, splits, keys and
order), in the sample format of ``sgexp.data.latent_format``. Work is spread by shard:
shard ``i`` belongs to rank ``i mod world_size`` (torchrun's RANK / WORLD_SIZE, or
``--rank/--world-size``), and within a rank to a pool of ``workers`` processes, one per
GPU by default. Each shard is written to a temporary file and renamed when complete,
so an interrupted run is resumed by running the same command again: finished shards
are skipped. ``encoding.json``, written first, records what the shards are (VAE
weights, scale, dtype, views); a rerun that asks for something else fails instead of
mixing two encodings. The process that finishes the last shard writes meta.json.
"""

from __future__ import annotations

import datetime
import json
import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds

import sgexp
from sgexp.checks import check_positive_int, fail
from sgexp.data import latent_format
from sgexp.data.bad_samples import BadSamples, ShardError
from sgexp.data.latent_format import FIELDS, encode_array
from sgexp.data.shards import read_meta, split_pipeline
from sgexp.progress import track
from sgexp.vae import LatentVAE, load_vae

log = logging.getLogger(__name__)

RECORD = "encoding.json"


# ----------------------------------------------------------------------------- placement


def distributed_position(rank: int | None, world_size: int | None) -> tuple[int, int, int]:
    """(rank, world size, local rank): the arguments, else torchrun's environment, else (0, 1, 0)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise fail("rank", rank, f"must be an integer in [0, world_size={world_size})")
    return rank, world_size, int(os.environ.get("LOCAL_RANK", 0))


def resolve_devices(device: str, workers: int, local_rank: int) -> list[str]:
    """One torch device per worker: GPUs round-robin from this rank's first (torchrun: one rank per GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return ["cpu"] * workers
    if device != "cuda":
        raise fail("device", device, "must be auto, cpu or cuda (GPUs are assigned to workers and ranks)")
    count = torch.cuda.device_count()
    if count == 0:
        raise fail("device", device, "no CUDA device is visible")
    return [f"cuda:{(local_rank * workers + k) % count}" for k in range(workers)]


def my_shards(names: list[str], rank: int, world_size: int) -> list[str]:
    """Shard ``i`` goes to rank ``i mod world_size``: a fixed assignment, whatever is already done."""
    return names[rank::world_size]


# ----------------------------------------------------------------------------- encoding one shard


def _prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Read (PNG decoding) in a thread while the caller encodes: zlib and PIL release the GIL."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def fill() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as exn:  # re-raised in the consumer, where it names the shard
            q.put(exn)

    threading.Thread(target=fill, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def encode_shard(
    vae: LatentVAE,
    image_dir: Path,
    image_meta: dict,
    out: Path,
    name: str,
    batch_size: int,
    flip: bool,
    dtype: str,
    advance: Callable[[int], None] | None = None,
) -> int:
    """Encode image shard ``name`` into ``out/name`` (via a temporary file); returns the number of samples."""
    # strict: a damaged image shard fails here, naming it, instead of leaving a short latent shard
    batches = split_pipeline([str(image_dir / name)], image_meta, batch_size, BadSamples(strict=True))
    for stale in out.glob(f"{name}.*.tmp"):  # left by a killed run; shards are never shared between processes
        stale.unlink(missing_ok=True)
    tmp = out / f"{name}.{os.getpid()}.tmp"
    written = 0
    try:
        sink = wds.TarWriter(str(tmp), mtime=0)  # fixed mtime: the same inputs give byte-identical shards
        for images, labels, keys in _prefetch(batches):
            x = torch.from_numpy(images).float() / 127.5 - 1.0  # (B, 3, R, R) in [-1, 1]
            views = torch.cat([x, x.flip(-1)]) if flip else x  # the mirror image in the same encoder batch
            mean, std = vae.encode_moments(views)  # (V·B, C, h, w) each
            # (V·B, ...) -> (B, V, ...): view 0 the image, view 1 its mirror
            mean, std = (a.unflatten(0, (-1, len(x))).transpose(0, 1).cpu().numpy().astype(dtype) for a in (mean, std))
            for i, key in enumerate(keys):
                fields = {FIELDS[0]: encode_array(mean[i]), FIELDS[1]: encode_array(std[i])}
                sink.write({"__key__": key, "cls": int(labels[i]), **fields})
            written += len(keys)
            if advance is not None:
                advance(len(keys))
        sink.close()
        expected = image_meta["shard_samples"][name]
        if written != expected:
            raise ShardError(f"image shard {image_dir / name} gave {written} samples, its meta.json says {expected}")
        os.replace(tmp, out / name)  # atomic: a shard under its final name is complete
    finally:
        tmp.unlink(missing_ok=True)
    return written


_WORKER: dict = {}  # per pool process: the loaded VAE and the job's constants


def _init_worker(job: dict, devices: list[str], counter) -> None:
    """Pool initializer: load the VAE once per process, on this worker's device.

    A failure is kept and raised by the first task instead: a Pool replaces a worker
    whose initializer raises, forever, and the parent would wait in silence.
    """
    try:
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        device = devices[index % len(devices)]
        if device == "cpu":  # workers share the cores instead of each taking all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
        vae = load_vae(job["vae_source"], device, job["scale"], job["shift"], job["vae_dtype"])
        if vae.identity != job["vae_identity"]:
            raise RuntimeError(f"the VAE at {job['vae_source']} changed while encoding (weights {vae.identity})")
        _WORKER.update(job, vae=vae)
    except Exception as exn:
        _WORKER["error"] = exn


def _encode_in_worker(name: str) -> tuple[str, int]:
    w = _WORKER
    if "error" in w:
        raise RuntimeError(f"a worker could not load the VAE: {type(w['error']).__name__}: {w['error']}")
    return name, _encode(w["vae"], w, name)


def _encode(vae: LatentVAE, job: dict, name: str, advance: Callable[[int], None] | None = None) -> int:
    """``encode_shard`` for one of ``job``'s shards, in this process or in a pool worker."""
    image_dir, image_meta, out = job["image_dir"], job["image_meta"], job["out"]
    return encode_shard(vae, image_dir, image_meta, out, name, job["batch_size"], job["flip"], job["dtype"], advance)


# ----------------------------------------------------------------------------- the dataset


def _record(vae, image_dir: Path, image_meta: dict, flip: bool, dtype: str, vae_dtype: str) -> dict:
    """What the shards are; two runs that agree on this write identical shards."""
    return {
        "vae": vae.describe(),
        "vae_dtype": vae_dtype,
        "latent": {
            "scale": vae.scale,
            "shift": vae.shift,
            "dtype": dtype,
            "views": list(latent_format.VIEWS[: 2 if flip else 1]),
            "fields": list(FIELDS),
            "stores": "VAE posterior mean and std, unscaled; the model sees scale * (mean + std * eps - shift)",
        },
        "images": {
            "dataset": str(image_dir.resolve()),
            "name": image_meta["name"],
            "created": image_meta.get("created"),
            "channels": image_meta["channels"],
            "resolution": image_meta["resolution"],
        },
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # atomic, and ranks never share a temporary
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _start(out: Path, record: dict, force: bool, world_size: int) -> bool:
    """Set up ``out`` for ``record``; True when it is already complete."""
    path = out / RECORD
    if force:
        if world_size > 1:
            raise fail("force", force, "deletes the output: run it once on a single process, then the ranks")
        for stale in [out / "meta.json", path, *out.glob("*.tar"), *out.glob("*.tmp")]:
            stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if path.exists():
        found = json.loads(path.read_text())
        if found != record:
            diff = sorted(k for k in record if found.get(k) != record[k])
            raise fail(
                "out",
                str(out),
                f"holds latents encoded differently (differs in {diff}; see {path}): use --force to start over",
            )
    else:
        _write_json(path, record)
    return (out / "meta.json").exists()


def _meta(out: Path, record: dict, image_meta: dict, vae, arguments: dict, command: str) -> dict:
    return {
        "name": out.name,
        "format": latent_format.FORMAT,
        "source": record["images"]["dataset"],
        "command": command,
        "arguments": arguments,
        "seed": image_meta.get("seed"),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sgexp_version": sgexp.__version__,
        "value_range": None,
        "num_classes": image_meta["num_classes"],
        "class_names": image_meta["class_names"],
        "channels": vae.latent_channels,
        "resolution": image_meta["resolution"] // vae.downsample,
        **{k: record[k] for k in ("latent", "vae", "vae_dtype", "images")},
        **{k: image_meta[k] for k in ("num_train", "num_val", "train_shards", "val_shards", "shard_samples")},
        "num_skipped": 0,  # a latent shard is complete or absent
    }


def _check_images(image_dir: Path, image_meta: dict, vae) -> None:
    if latent_format.is_latent(image_meta):
        raise fail("images", str(image_dir), "is already a latent dataset: pass the image dataset it was made from")
    if image_meta["channels"] != vae.in_channels:
        raise fail(
            "images", str(image_dir), f"has {image_meta['channels']}-channel images, the VAE takes {vae.in_channels}"
        )
    if image_meta["resolution"] % vae.downsample:
        why = f"resolution {image_meta['resolution']} is not a multiple of the VAE's factor {vae.downsample}"
        raise fail("images", str(image_dir), why)
    if "shard_samples" not in image_meta:
        raise fail("images", str(image_dir), "its meta.json has no shard_samples: prepare it again with this sgexp")


def prepare_latents(
    images: str | os.PathLike,
    vae: str,
    out: str | os.PathLike | None = None,
    batch_size: int = 64,
    flip: bool = False,
    dtype: str = "float16",
    scale: float | None = None,
    vae_dtype: str = "float32",
    workers: int | None = None,
    device: str = "auto",
    force: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    command: str | None = None,
) -> Path:
    """Encode the prepared image dataset ``images`` with the AutoencoderKL ``vae`` (directory or hub id).

    ``out`` defaults to ``<images>_latents`` next to it. ``flip`` also stores the mirror
    image's latents (for ``data.hflip``); ``dtype`` is the storage precision of the
    posterior mean and std, ``vae_dtype`` the encoder's compute precision; ``scale``
    overrides the VAE config's scaling factor (SD-VAE: 0.18215). ``workers`` processes
    per rank (default: one per visible GPU, else 1). Returns ``out``, which holds
    meta.json once every rank's shards are there.
    """
    check_positive_int("batch_size", batch_size)
    latent_format.check_dtype(dtype)
    rank, world_size, local_rank = distributed_position(rank, world_size)
    if workers is None:
        workers = max(1, torch.cuda.device_count()) if device in ("auto", "cuda") and world_size == 1 else 1
    check_positive_int("workers", workers)
    devices = resolve_devices(device, workers, local_rank)
    image_dir = Path(images)
    image_meta = read_meta(image_dir)  # FileNotFoundError that says how to prepare it
    out = Path(out) if out is not None else image_dir.parent / f"{image_dir.name}_latents"
    if out.resolve() == image_dir.resolve():
        raise fail("out", str(out), "must differ from the image dataset's directory")
    encoder = load_vae(vae, "cpu", scale, None, vae_dtype)  # checks the source before any work
    _check_images(image_dir, image_meta, encoder)
    record = _record(encoder, image_dir, image_meta, flip, dtype, vae_dtype)
    if _start(out, record, force, world_size):
        log.info("%s is already prepared (meta.json exists); use --force to rebuild", out)
        return out

    names = image_meta["train_shards"] + image_meta["val_shards"]
    todo = [n for n in my_shards(names, rank, world_size) if not (out / n).exists()]
    total = sum(image_meta["shard_samples"][n] for n in todo)
    where = ", ".join(sorted(set(devices)))
    log.info(
        "rank %d/%d: encoding %d of %d shards (%d images) on %s", rank, world_size, len(todo), len(names), total, where
    )
    job = {
        "image_dir": image_dir,
        "image_meta": image_meta,
        "out": out,
        "batch_size": batch_size,
        "flip": flip,
        "dtype": dtype,
        "vae_source": encoder.source,
        "vae_identity": encoder.identity,
        "scale": encoder.scale,
        "shift": encoder.shift,
        "vae_dtype": vae_dtype,
    }
    _run(encoder, job, todo, devices, total, show=rank == 0)

    missing = [n for n in names if not (out / n).exists()]
    if missing:
        log.info("%d shards are still being encoded by other ranks; the last to finish writes meta.json", len(missing))
        return out
    arguments = {
        "images": str(image_dir),
        "vae": vae,
        "out": str(out),
        "batch_size": batch_size,
        "flip": flip,
        "dtype": dtype,
        "scale": scale,
        "vae_dtype": vae_dtype,
    }
    command = command or f"prepare_latents({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
    for stale in out.glob("*.tar.*.tmp"):  # every shard is complete: what is left is debris of killed runs
        stale.unlink(missing_ok=True)
    _write_json(out / "meta.json", _meta(out, record, image_meta, encoder, arguments, command))
    log.info("prepared %s: %d train / %d val latents", out, image_meta["num_train"], image_meta["num_val"])
    return out


def _run(encoder, job: dict, todo: list[str], devices: list[str], total: int, show: bool = True) -> None:
    """Encode ``todo``: in this process with one worker, else in a pool (one VAE per process).
    ``show``: progress (rank 0's; a bar on a terminal, log lines otherwise: ``sgexp.progress``)."""
    with track(f"encoding {Path(job['out']).name}", total, "images", enabled=bool(todo and show)) as advance:
        if len(devices) == 1 or len(todo) <= 1:
            encoder.to(devices[0])
            for name in todo:
                _encode(encoder, job, name, advance)
            return
        # CUDA cannot be used in a forked child; on CPU, fork saves each worker the imports
        context = multiprocessing.get_context("spawn" if devices[0].startswith("cuda") else "fork")
        counter = context.Value("i", 0)
        with context.Pool(len(devices), _init_worker, (job, devices, counter)) as pool:
            for name, n in pool.imap_unordered(_encode_in_worker, todo):
                advance(n)
                log.debug("encoded %s (%d samples)", name, n)
