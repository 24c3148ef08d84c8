"""The resumable training stream: every batch is a pure function of its position.

Per rank r and DataLoader worker role w of W, a stream of sample *slots*:

    epoch e = 0, 1, ...:  every train shard once, in an order drawn from RNG(seed, r, w, e)
      ->  windows of ``shuffle_shards`` consecutive shards of that order
      ->  window k: its slots (meta.json's ``shard_samples``) permuted by RNG(seed, r, w, e, k),
          and per slot a flip bit and an ε seed from the same RNG
      ->  local batch i = slots [i·B, (i+1)·B)  ->  skip the batches already trained on
      ->  read the window's shards  ->  field check  ->  PNG decode  ->  (images in [-1, 1], labels)
                                                     or latent decode  ->  (scale · (mean + std·ε − shift), labels)

Global batch j of a rank comes from role j % W (PyTorch hands out worker batches
round-robin), so the stream is a pure function of (seed, rank, W, batch size)
and a resumed run at batch k yields exactly batches k, k+1, ... of a fresh run.

Why slots: no random draw depends on bytes read earlier (as a streaming shuffle
buffer's state does), only on meta.json's per-shard counts. Resuming at local
batch i is therefore arithmetic: the epoch is i·B // (train samples), the window
follows from the counts in O(shards), and only that window's shards are read:
at most ``shuffle_shards`` shards of skipped samples, at step 10 or at step 10^6.

Every (rank, role) walks all train samples each epoch, in its own order: across
ranks and roles samples are drawn with replacement (each rank's stream is
independent of the world size), so every rank runs the same number of steps.

A slot whose sample is missing (truncated shard) or unusable (missing field,
bad label, undecodable image) is dropped from its batch, which is then shorter;
positions never depend on what could be read. Memory: a worker holds one
window, ``shuffle_shards`` shards of raw bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from itertools import count, islice
from pathlib import Path

import torch

from sgexp.checks import check_positive_int
from sgexp.data.bad_samples import BadSamples, ShardError
from sgexp.data.shards import _check, _decode_stage, _model_stage, _tar_samples

# Shards per shuffle window: 4,000 samples mixed (prepare shuffles before sharding, so every
# shard already mixes classes) for 4 shards of bytes per loader worker: ~0.5 GB of
# ImageNet-256 PNGs, ~0.13 GB of its latents.
SHUFFLE_SHARDS = 4


def shard_counts(urls: list[str], meta: dict, where: str = "") -> list[int]:
    """Samples per shard from meta.json, in ``urls`` order: what positions are computed from."""
    counts = meta.get("shard_samples", {})
    missing = [Path(url).name for url in urls if Path(url).name not in counts]
    if missing:
        root = where or str(Path(urls[0]).parent)
        raise ValueError(
            f"meta.json of {root} has no sample count for {missing[0]} (shard_samples, written by prepare):"
            f" the training stream needs them to resume; prepare the dataset again with --force"
        )
    return [int(counts[Path(url).name]) for url in urls]


def batches_before(position: int, role: int, workers: int) -> int:
    """How many of the global batches 0..position-1 come from worker role ``role``."""
    return max(0, (position - role + workers - 1) // workers)


# ----------------------------------------------------------------------------- positions (no reading)


@dataclass(frozen=True)
class Window:
    """``shuffle_shards`` consecutive shards of one epoch's order, whose samples are shuffled together."""

    stream: str  # "seed/rank/role"
    epoch: int
    index: int  # window number within the epoch
    shards: tuple[int, ...]  # indices into the url list
    counts: tuple[int, ...]  # samples per shard, from meta.json
    start: int  # the window's first slot in the role's stream

    @property
    def size(self) -> int:
        return sum(self.counts)

    def plan(self) -> tuple[list[int], list[bool], list[int]]:
        """(sample for each slot, flip bit per slot, ε seed per slot), from this window's own RNG.

        All three are always drawn, so the order does not depend on hflip or the format.
        """
        rng = random.Random(f"window/{self.stream}/{self.epoch}/{self.index}")
        order = list(range(self.size))
        rng.shuffle(order)
        flips = [rng.random() < 0.5 for _ in order]
        seeds = [rng.getrandbits(63) for _ in order]
        return order, flips, seeds


def windows_from(slot: int, counts: list[int], shuffle_shards: int, stream: str) -> Iterator[Window]:
    """The windows of ``stream`` from the one holding ``slot`` on, endlessly; found from the counts alone."""
    per_epoch = sum(counts)
    epoch = slot // per_epoch  # whole epochs skipped without a look at their shards
    while True:
        order = list(range(len(counts)))
        random.Random(f"shards/{stream}/{epoch}").shuffle(order)
        start = epoch * per_epoch
        for index, first in enumerate(range(0, len(order), shuffle_shards)):
            shards = tuple(order[first : first + shuffle_shards])
            window = Window(stream, epoch, index, shards, tuple(counts[s] for s in shards), start)
            if window.start + window.size > slot:
                yield window
            start += window.size
        epoch += 1


# ----------------------------------------------------------------------------- reading


def read_shard(url: str, meta: dict, bad: BadSamples) -> list[dict | None]:
    """One shard's samples in tar order; None for a sample that fails the field check.

    Read to the end, so that ``_tar_samples`` reports a shard that ends early.
    """
    tar = reduce(lambda stream, stage: stage(stream), _tar_samples(meta, bad), iter([{"url": url}]))
    return [_check(sample, meta, bad) for sample in tar]


class _Reader:
    """Reads windows, raising when ``patience`` shards in a row gave no usable sample.

    Without the guard, a dataset whose shards are all unreadable would yield
    empty batches (dropped) forever, in silence.
    """

    def __init__(self, urls: list[str], meta: dict, bad: BadSamples):
        self.urls, self.meta, self.bad = urls, meta, bad
        self.patience = 2 * len(urls)  # 2N shards in a row span a whole epoch: every shard failed
        self.idle = 0

    def samples(self, window: Window) -> list[dict | None]:
        """The window's samples, shard after shard; None where meta.json counts one the tar did not give."""
        samples: list[dict | None] = []
        for shard, expected in zip(window.shards, window.counts, strict=True):
            got = read_shard(self.urls[shard], self.meta, self.bad)[:expected] if expected else []
            if expected:  # a shard that prepare left empty says nothing about damage
                self._progress(any(s is not None for s in got))
            samples += got + [None] * (expected - len(got))
        return samples

    def _progress(self, readable: bool) -> None:
        self.idle = 0 if readable else self.idle + 1
        if self.idle >= self.patience:
            raise ShardError(
                f"no readable sample in the last {self.idle} shards read from {len(self.urls)} shards"
                f" ({Path(self.urls[0]).parent}): the shards are damaged, rerun prepare with --force"
            )


def _window_slots(window: Window, skip: int, reader: _Reader, hflip: bool) -> Iterator[dict | None]:
    """One window's slots after the first ``skip``: a sample with its flip bit and ε seed, or None."""
    samples = reader.samples(window)
    order, flips, seeds = window.plan()
    for j in range(skip, window.size):
        sample = samples[order[j]]
        yield None if sample is None else {**sample, "flip": hflip and flips[j], "noise_seed": seeds[j]}


def _slots(windows: Iterator[Window], first_slot: int, reader: _Reader, hflip: bool) -> Iterator[dict | None]:
    """The role's slots from ``first_slot`` on.

    One generator per window, so a window's bytes are released before the next is read.
    """
    for window in windows:
        yield from _window_slots(window, max(0, first_slot - window.start), reader, hflip)


def _batches(slots: Iterator[dict | None], batch_size: int, num_batches: int | None) -> Iterator[list[dict]]:
    """Lists of raw samples, ``batch_size`` slots each, without the empty slots.

    A batch whose slots are all empty is dropped (rare: a window of badly damaged
    shards); the reader's guard stops a stream that only has empty slots.
    """
    for _ in count() if num_batches is None else range(num_batches):
        batch = [sample for sample in islice(slots, batch_size) if sample is not None]
        if batch:
            yield batch


# ----------------------------------------------------------------------------- dataset


class TrainStream(torch.utils.data.IterableDataset):
    """Endless (or ``total_batches`` long) deterministic training batches of one rank.

    ``start_batch`` resumes: the stream then begins at global batch ``start_batch``
    and is identical to the tail of a stream started at 0 with the same seed,
    rank, batch size, number of workers and ``shuffle_shards``; reaching it reads
    at most one window of shards, whatever ``start_batch``.
    """

    def __init__(
        self,
        urls: list[str],
        meta: dict,
        batch_size: int,
        bad: BadSamples,
        seed: int = 0,
        rank: int = 0,
        start_batch: int = 0,
        total_batches: int | None = None,
        shuffle_shards: int = SHUFFLE_SHARDS,
        hflip: bool = False,
    ):
        super().__init__()
        check_positive_int("shuffle_shards", shuffle_shards)
        self.counts = shard_counts(urls, meta)
        if not sum(self.counts):
            raise ValueError(f"no training sample in {Path(urls[0]).parent if urls else 'the dataset'} (meta.json)")
        self.urls, self.meta, self.batch_size, self.bad = urls, meta, batch_size, bad
        self.seed, self.rank, self.start_batch, self.total_batches = seed, rank, start_batch, total_batches
        self.shuffle_shards, self.hflip = shuffle_shards, hflip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader worker 0 hands out the first batch, which after a resume is
        # global batch start_batch: worker i therefore plays role (i + start_batch) % W.
        role = (worker + self.start_batch) % workers
        first = batches_before(self.start_batch, role, workers)  # local batches already trained on
        stop = None if self.total_batches is None else batches_before(self.total_batches, role, workers)
        first_slot = first * self.batch_size
        windows = windows_from(first_slot, self.counts, self.shuffle_shards, f"{self.seed}/{self.rank}/{role}")
        slots = _slots(windows, first_slot, _Reader(self.urls, self.meta, self.bad), self.hflip)
        batches = _batches(slots, self.batch_size, None if stop is None else max(0, stop - first))
        # the latent decoder draws ε from each sample's seed; the image decoder ignores it
        decoded = _decode_stage(self.meta, self.bad)(batches)
        return iter(_model_stage(self.meta)(decoded))
