"""Checkpoints on disk: atomic writes, the run's config inside every checkpoint, config.yaml after loading.

The rule for where a run continues lives in ``sgexp.runs``; this module is the Lightning side of it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from sgexp import runs

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, writing through ``sgexp.runs.atomic_save``: a process killed at any
    moment of a save leaves the previous checkpoint intact, and a later step is never overwritten."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r} is invalid: AtomicCheckpointIO takes none")
        runs.atomic_save(checkpoint, path)


class RunConfig(L.Callback):
    """Stores the run's resolved config in every checkpoint (``checkpoint['sgexp_config']``), so a resume
    can tell whether a checkpoint belongs to the same run, and writes ``<run_dir>/config.yaml`` once
    training starts, i.e. after any checkpoint has loaded: a failed resume leaves the old file alone."""

    def __init__(self, config: dict, run_dir: str | Path):
        self.config = config
        self.path = Path(run_dir) / "config.yaml"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[runs.CONFIG_KEY] = self.config

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            tmp = self.path.with_name(".config.yaml.tmp")
            OmegaConf.save(OmegaConf.create(self.config), tmp)
            tmp.replace(self.path)


class FinalCheckpoint(L.Callback):
    """Write ``last.ckpt`` when training ends, whatever step it ends at (max_steps or max_time)."""

    def __init__(self, dirpath: str | Path):
        self.path = Path(dirpath) / "last.ckpt"

    def on_train_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)
