"""LightningDataModule over prepared shards: resumable training stream, single-pass validation."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from sgexp.checks import check_positive_int, fail
from sgexp.data.bad_samples import BadSamples
from sgexp.data.latent_format import check_hflip, is_latent
from sgexp.data.shards import eval_dataset, read_meta, shard_urls
from sgexp.data.stream import SHUFFLE_SHARDS, TrainStream, shard_counts


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGUSR1 to the training process (``sgexp.lit.stop``): Ctrl-C reaches
    the whole foreground process group and ``scancel --signal=USR1`` every process of a job step, and a
    worker killed by them makes the training process raise mid-step, before it can save its checkpoint.
    SIGTERM keeps its default: it is how multiprocessing ends a worker (a worker ignoring it hangs the
    interpreter's exit); ``StopOnSignal`` instead stops PyTorch from raising when workers die of it."""
    for signum in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


class ShardDataModule(L.LightningDataModule):
    """Batches ``(images float32 (B, C, R, R) in [-1, 1], labels int64 (B,))`` from ``root``.

    ``root`` is a prepared dataset directory (with meta.json), whose word decides what
    a sample is: for a latent dataset (``"format": "latent"``) a batch holds scaled VAE
    latents instead, a fresh posterior sample ``scale · (mean + std·ε − shift)`` per
    training step and the posterior mean for validation; ``channels`` and ``resolution``
    are then the latents' and ``hflip`` picks the stored latents of the mirror image.

    Training is an endless stream (epochs over all train samples, in an order of its
    own per rank and worker), or ``max_steps * accumulate_grad_batches`` batches per
    rank when ``max_steps`` is given (None or -1: endless), and resumes where the
    checkpoint stopped: ``train_dataloader()`` starts at batch ``global_step *
    accumulate_grad_batches`` of the attached trainer (Lightning restores the
    checkpoint before asking for the loader), or at ``set_start_batch(k)``. Resuming
    needs the same seed, batch size, world size, ``num_workers`` and ``shuffle_shards``,
    and reads at most ``shuffle_shards`` shards before its first batch, whatever the
    step (``stream.TrainStream``). Samples are shuffled ``shuffle_shards`` shards at
    a time, so each loader worker holds that many shards' raw bytes.

    Bad samples and truncated shards are skipped, counted (``bad_samples``) and
    logged; with ``strict=True`` they raise ``ShardError`` naming the shard.
    """

    def __init__(
        self,
        root: str,
        batch_size: int,
        num_workers: int = 2,
        val_batch_size: int | None = None,
        hflip: bool = False,
        strict: bool = False,
        seed: int = 0,
        shuffle_shards: int = SHUFFLE_SHARDS,
        max_steps: int | None = None,
    ):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise fail("num_workers", num_workers, "must be an integer >= 0 (0 loads in the main process)")
        if val_batch_size is not None:
            check_positive_int("val_batch_size", val_batch_size)
        check_positive_int("shuffle_shards", shuffle_shards)
        if max_steps == -1:  # Lightning's spelling of "no limit"
            max_steps = None
        if max_steps is not None:
            check_positive_int("max_steps", max_steps)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise fail("seed", seed, "must be an integer")
        self.root = Path(root)
        self.meta = read_meta(self.root)
        shard_counts(shard_urls(self.root, self.meta, "train"), self.meta, str(self.root))  # fail now, not at fit
        check_hflip(self.meta, hflip, str(self.root))
        self.latent: bool = is_latent(self.meta)
        self.num_classes: int = self.meta["num_classes"]
        self.channels: int = self.meta["channels"]
        self.resolution: int = self.meta["resolution"]
        self.batch_size, self.num_workers = batch_size, num_workers
        self._val_batch_size = val_batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.hflip, self.strict, self.seed = hflip, strict, seed
        self.shuffle_shards, self.max_steps = shuffle_shards, max_steps
        self._start_batch: int | None = None
        # one counter per split, shared with the loader workers; survives loader rebuilds
        self._bad = {"train": BadSamples(strict), "val": BadSamples(strict)}

    # -- position and topology ------------------------------------------------

    def set_start_batch(self, batch: int | None) -> None:
        """Start the next training loader at global batch ``batch`` (None: follow the trainer)."""
        if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 0):
            raise fail("batch", batch, "must be an integer >= 0 or None")
        self._start_batch = batch

    @property
    def start_batch(self) -> int:
        if self._start_batch is not None:
            return self._start_batch
        if self.trainer is not None:
            return self.trainer.global_step * self.trainer.accumulate_grad_batches
        return 0

    def _topology(self) -> tuple[int, int]:
        """(rank, world size), taken in the main process and handed to the workers explicitly."""
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def set_global_batch_size(self, global_batch_size: int, world_size: int, accumulate: int = 1) -> int:
        """Per-device batch size for a global batch: ``global / (world_size · accumulate)``, which must divide.

        The recipe's batch (256 for the SG paper) then holds on 1 GPU or N nodes alike.
        """
        check_positive_int("global_batch_size", global_batch_size)
        share = world_size * accumulate
        if global_batch_size % share:
            raise fail(
                "global_batch_size",
                global_batch_size,
                f"must be a multiple of devices x nodes x accumulate_grad_batches = {world_size} x {accumulate}",
            )
        self.batch_size = global_batch_size // share
        if self._val_batch_size is None:
            self.val_batch_size = self.batch_size
        return self.batch_size

    @property
    def bad_samples(self) -> dict[str, int]:
        """Bad samples skipped so far, per split, counted over all loader workers."""
        return {split: bad.count for split, bad in self._bad.items()}

    # -- loaders --------------------------------------------------------------

    def _loader(self, dataset: torch.utils.data.IterableDataset) -> DataLoader:
        # Batches are built inside the workers (batch_size=None); PyTorch returns the
        # workers' batches round-robin, in order, which the resume logic relies on.
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            worker_init_fn=ignore_stop_signals,
        )

    def train_dataloader(self) -> DataLoader:
        rank, _ = self._topology()
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        dataset = TrainStream(
            shard_urls(self.root, self.meta, "train"),
            self.meta,
            self.batch_size,
            self._bad["train"],
            seed=self.seed,
            rank=rank,
            start_batch=self.start_batch,
            total_batches=None if self.max_steps is None else self.max_steps * accumulate,
            shuffle_shards=self.shuffle_shards,
            hflip=self.hflip,
        )
        return self._loader(dataset)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._topology()
        urls = shard_urls(self.root, self.meta, "val")
        dataset = eval_dataset(urls, self.meta, self.val_batch_size, self._bad["val"], rank, world_size)
        return self._loader(dataset)
