"""Checkpoints on disk: the periodic and final checkpoint callbacks, atomic writes, the run's config inside every
checkpoint, config.yaml after loading, and the start of a fine-tuning run (``init_from``).

The rule for where a run continues lives in ``sgexp.runs``; this module is the Lightning side of it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from sgexp import runs
from sgexp.models.dit import DiTConfig

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


def checkpoint_callbacks(c, ckpt_dir: Path) -> list[L.Callback]:
    """step-<N>.ckpt kept every ``every_n_steps``; last.ckpt every ``last_every_n_steps`` and at the end."""
    return [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=c.every_n_steps,
            save_top_k=-1,
            save_last=False,
        ),
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="last",
            every_n_train_steps=c.last_every_n_steps,
            save_top_k=1,
            enable_version_counter=False,
        ),
        FinalCheckpoint(ckpt_dir),
    ]


# Architecture fields that must agree to copy weights; routes, γ_train and label dropout may differ (a dense
# model fine-tuned with TREAD routing, a TREAD model fine-tuned dense).
FREE_IN_FINETUNE = ("routes", "class_dropout_prob", "prediction")
# Properties of the weights of an imported network (sgexp.models.upstream): a fine-tune keeps them.
CONVENTIONS = ("time_scale", "time_reversed", "output_sign", "pos_embed")


def finetune_network(network: DiTConfig, source: str | Path) -> DiTConfig:
    """The network of a run that starts from ``source``: this config's, with the source's conventions
    (time input, output sign, stored position table of an imported network). Trained by flow matching, it
    predicts velocity, even when the source was DiT's ε-prediction network."""
    held = runs.open_checkpoint(source)["hyper_parameters"]["model"]
    return replace(network, **{k: held[k] for k in CONVENTIONS if k in held}, prediction="velocity")


def load_initial_weights(module, source: str | Path, which: str = "ema") -> dict[str, Any]:
    """Copy the weights of checkpoint ``source`` (its EMA model, or the trained ``model``) into ``module``'s
    network and EMA copy: the start of a fine-tuning run (``init_from=``). Optimizer, schedule, step and EMA
    count stay fresh. Returns the source's network config. Fails naming the differing fields or keys."""
    if which not in ("ema", "model"):
        raise ValueError(f"init_from_weights={which!r} is invalid: must be 'ema' or 'model'")
    try:
        state = runs.open_checkpoint(source, mmap=True)
    except runs.CheckpointError as err:
        raise ValueError(f"init_from={str(source)!r} is invalid: {err}") from None
    held = dict(state["hyper_parameters"]["model"])
    mine = module.config.to_dict()
    differ = [k for k in mine if k not in FREE_IN_FINETUNE and k in held and held[k] != mine[k]]
    if differ:
        what = "; ".join(f"{k}: checkpoint {held[k]!r}, config {mine[k]!r}" for k in differ)
        raise ValueError(f"init_from={str(source)!r} is invalid: another network ({what})")
    prefix = "ema.model." if which == "ema" else "model."
    weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"init_from={str(source)!r} is invalid: no {which} weights ('{prefix}*') in it")
    missing, unexpected = module.model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"init_from={str(source)!r} is invalid: weights do not fit the network "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    module.ema.model.load_state_dict(module.model.state_dict())
    log.info("initialised from the %s weights of %s (step %d)", which, source, int(state["global_step"]))
    return held
