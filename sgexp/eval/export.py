"""Samples as an ``.npz`` the ADM evaluator reads, written while they are generated.

ADM's evaluation suite (Dhariwal & Nichol 2021; openai/guided-diffusion ``evaluations/evaluator.py``)
scores a sample batch from the ``arr_0`` member of an npz: uint8, (N, H, W, 3), RGB in [0, 255]
(it streams the member when its .npy header is version 1.0 or 2.0 and C-ordered). DiT's and
SiT's ``sample_ddp.py`` write exactly that member. Here the file also carries ``labels`` (N,)
int64, the class of each sample, which the ADM evaluator ignores.

50k ImageNet-256 samples are 9.8 GB, so they never sit in memory together:

- each rank appends its batches as they come to its own shard, an ``.npy`` of (its sample
  count, H, W, 3) in ``<out_dir>/.<setting>.npz.shards/``, and writes the indices and labels
  it generated beside it when done (``ShardWriter``);
- rank 0 then copies the shards, in sample-index order and 256 samples at a time, into the zip
  member ``arr_0.npy`` of a temporary file and renames it to ``<out_dir>/<setting>.npz``
  (``merge_shards``): a reader never sees a half-written file. Several nodes need ``out_dir``
  on a shared filesystem.

Grey images (MNIST) are repeated to three channels; latent samples arrive already decoded.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from sgexp.checks import fail

IMAGES, LABELS = "arr_0", "labels"
MERGE_CHUNK = 256  # samples copied per step of the merge: 50 MB at 256x256


def shard_dir(npz: Path) -> Path:
    """Where the ranks' shards of ``npz`` go before the merge (hidden, beside it)."""
    return npz.parent / f".{npz.name}.shards"


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """uint8 (B, C, H, W), C in {1, 3} -> uint8 (B, H, W, 3) numpy, grey repeated to RGB."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise fail("images", f"{images.dtype} {tuple(images.shape)}", "must be uint8 (B, C, H, W) with C = 1 or 3")
    array = images.cpu().numpy().transpose(0, 2, 3, 1)
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else np.ascontiguousarray(array)


def _npy_header(shape: tuple, dtype) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}


class ShardWriter:
    """One rank's samples of one setting, appended batch by batch: ``add(indices, images, labels)``,
    then ``close()``. ``count`` is how many samples this rank will write (``rank_indices``).

    The images go to an ``.npy`` file by plain appends (no memory map): the process holds one
    batch, the rest is the operating system's to flush."""

    def __init__(self, npz: Path, rank: int, count: int):
        self.dir = shard_dir(Path(npz))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images_path = self.dir / f"rank{rank:05d}.images.npy"
        self.meta_path = self.dir / f"rank{rank:05d}.meta.npz"
        self.count, self.filled = count, 0
        self.file = None  # opened at the first batch, when H and W are known (the .npy header needs them)
        self.indices: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, indices, images: torch.Tensor, labels) -> None:
        batch = to_nhwc(images)
        if self.filled + len(batch) > self.count:
            raise fail("indices", f"{self.filled + len(batch)} samples", f"this shard holds {self.count}")
        if self.file is None:
            self.file = open(self.images_path, "wb")  # closed in close()
            np.lib.format.write_array_header_1_0(self.file, _npy_header((self.count, *batch.shape[1:]), np.uint8))
        self.file.write(batch.tobytes())
        self.filled += len(batch)
        self.indices.append(np.asarray(indices, dtype=np.int64))
        self.labels.append(np.asarray(labels, dtype=np.int64))

    def close(self) -> None:
        """Close the images and write indices and labels, atomically: the merge trusts what it finds."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.filled != self.count:
            raise fail("count", self.count, f"this shard was promised {self.count} samples and got {self.filled}")
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, indices=cat(self.indices), labels=cat(self.labels))
        os.replace(tmp, self.meta_path)


class _ShardReader:
    """Rows of a shard's ``.npy`` read with seek + read (no memory map)."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")  # closed by merge_shards
        np.lib.format.read_magic(self.file)
        shape, _, _ = np.lib.format.read_array_header_1_0(self.file)
        self.offset, self.row_shape = self.file.tell(), shape[1:]
        self.row_bytes = int(np.prod(self.row_shape))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (ascending within a chunk: a rank writes its indices in order), one read."""
        lo, hi = int(rows.min()), int(rows.max()) + 1
        self.file.seek(self.offset + lo * self.row_bytes)
        block = np.frombuffer(self.file.read((hi - lo) * self.row_bytes), np.uint8)
        return block.reshape(hi - lo, *self.row_shape)[rows - lo]


def _write_member(archive: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks) -> None:
    """A .npy member written chunk by chunk: the header first (format 1.0, C order: what ADM streams).
    The member's timestamp is fixed (ZipInfo's 1980-01-01), so equal samples give equal files."""
    with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w", force_zip64=True) as member:  # zip64: over 4 GB
        np.lib.format.write_array_header_1_0(member, _npy_header(shape, dtype))
        for chunk in chunks:
            member.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())


def merge_shards(npz: Path, num_samples: int) -> Path:
    """All ranks' shards of ``npz`` -> ``npz`` with ``arr_0`` (N, H, W, 3) uint8 and ``labels`` (N,),
    rows in sample-index order; written to a temporary file, renamed, then the shards are removed.

    Every index in ``0..num_samples-1`` must be in exactly one shard."""
    npz = Path(npz)
    shards = sorted(shard_dir(npz).glob("rank*.meta.npz"))
    parts = []
    for meta in shards:
        with np.load(meta) as z:
            parts.append((z["indices"], z["labels"]))
    indices = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, np.int64)
    if not np.array_equal(np.sort(indices), np.arange(num_samples)):
        raise fail(
            "npz",
            str(npz),
            f"its {len(shards)} shards in {shard_dir(npz)} hold {len(indices)} indices, not each of"
            f" 0..{num_samples - 1} once (shards left by an interrupted run? remove that directory)",
        )
    readers = [
        _ShardReader(m.with_name(m.name.replace(".meta.npz", ".images.npy"))) if len(i) else None
        for m, (i, _) in zip(shards, parts, strict=True)
    ]
    # Where each sample index lives: (shard, row), in index order.
    shard_of = np.concatenate([np.full(len(i), k) for k, (i, _) in enumerate(parts)])
    row_of = np.concatenate([np.arange(len(i)) for i, _ in parts])
    order = np.argsort(indices, kind="stable")
    shard_of, row_of = shard_of[order], row_of[order]
    labels = np.concatenate([lab for _, lab in parts])[order]
    row_shape = next(r.row_shape for r in readers if r is not None)

    def ordered_chunks():
        for start in range(0, num_samples, MERGE_CHUNK):
            s, r = shard_of[start : start + MERGE_CHUNK], row_of[start : start + MERGE_CHUNK]
            chunk = np.empty((len(s), *row_shape), np.uint8)
            for k in np.unique(s):
                chunk[s == k] = readers[k].rows(r[s == k])
            yield chunk

    tmp = npz.with_name(f".{npz.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            _write_member(archive, IMAGES, (num_samples, *row_shape), np.uint8, ordered_chunks())
            _write_member(archive, LABELS, (num_samples,), np.int64, [labels])
    finally:
        for reader in readers:
            if reader is not None:
                reader.file.close()
    os.replace(tmp, npz)
    shutil.rmtree(shard_dir(npz))
    return npz
