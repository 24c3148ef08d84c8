"""Run directories: where a run lives, where it continues, who may write to it, and how a checkpoint reaches the disk.

One rule for every entry point (``sgexp.train`` started by hand, re-run with the same command, requeued
by SLURM with or without a signal; ``sgexp.evaluate``): **a run directory's state is its newest complete
checkpoint** — of ``hpc_ckpt_<n>.ckpt`` (saved on SLURM's SIGUSR1), ``checkpoints/last.ckpt`` and
``checkpoints/step-<N>.ckpt`` the one whose *stored* global step is highest, not the newest by file name
or modification time (a requeue can leave an hpc checkpoint older than ``last.ckpt``, and the reverse).

- Complete: checkpoints are written to a temporary file in the same directory, fsync'd and renamed over
  the target (``atomic_save``), so a process killed at any moment leaves the old file or the new one. A
  file that still cannot be read (copied half, damaged disk) is skipped with a warning naming it, and the
  next newest good one is used.
- Never older: ``atomic_save`` refuses to replace a checkpoint that holds a later step.
- Cheap: the step is read with ``torch.load(mmap=True)``, which unpickles the small index and maps the
  tensors without reading them, so finding the state of an XL/2 run (10 GB checkpoints) takes
  milliseconds. ``step-<N>`` file names are used only to skip files that cannot be newer than one already
  read; the answer is always a step read from inside a file.
- One writer: ``RunLock`` (``sgexp.run_lock``) names its holder; a second training on the same directory
  fails at once naming it, and a lock left by a dead process or an earlier run of the same SLURM job (a
  requeue) is taken over with a message.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from sgexp.checks import fail
from sgexp.models.dit import DiTConfig
from sgexp.run_lock import RunDirectoryBusy, RunLock, slurm_job  # noqa: F401  (part of a run directory's API)

log = logging.getLogger("sgexp.runs")

CONFIG_KEY = "sgexp_config"  # the resolved training config, stored in every checkpoint (sgexp.lit.checkpointing)
STEP_FILE = re.compile(r"step-(\d+)\.ckpt$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file, why, and what else exists."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    global_step: int

    def __str__(self) -> str:
        return f"{self.path} (step {self.global_step})"


# --------------------------------------------------------------------------- where a run lives


def resolve_paths(cfg: Any) -> tuple[Path, Path | None]:
    """(run directory, checkpoint file named by ``resume=`` or None) of a training config.

    A resumed run (``resume``: a checkpoint or a run directory) keeps its run directory, so it finds its
    checkpoints and MLflow run again. Otherwise: ``paths.run_dir`` (``sgexp.slurm`` fixes it at submission),
    else ``<runs_dir>/<experiment>/slurm-<job id>`` in a SLURM job (all ranks and requeues must agree,
    which a timestamp would not), else ``<runs_dir>/<experiment>/<timestamp>``.
    """
    ckpt = None
    if cfg.resume:
        target = Path(cfg.resume).expanduser().resolve()
        if target.is_dir():
            run_dir = target
        elif target.is_file():
            ckpt, run_dir = target, run_dir_of(target)
        else:
            raise fail("resume", cfg.resume, "no such checkpoint file or run directory")
        if cfg.paths.run_dir and Path(cfg.paths.run_dir).resolve() != run_dir:
            raise fail("paths.run_dir", cfg.paths.run_dir, f"resume uses the run directory {run_dir}")
    elif cfg.paths.run_dir:
        run_dir = Path(cfg.paths.run_dir).resolve()
    elif job := slurm_job():
        run_dir = Path(cfg.paths.runs_dir).resolve() / cfg.experiment / f"slurm-{job}"
    else:
        run_dir = Path(cfg.paths.runs_dir).resolve() / cfg.experiment / datetime.now().strftime("%Y%m%d-%H%M%S")
    return run_dir, ckpt


# --------------------------------------------------------------------------- reading


def open_checkpoint(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """The checkpoint dict of ``path`` (tensors memory-mapped unless ``mmap=False``).

    Raises ``CheckpointError`` naming the file and why it is unusable (missing, not a torch zip archive,
    truncated, not a training checkpoint) instead of an unpickler traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive whose index sits at the end
        raise CheckpointError(f"{path}: not a complete checkpoint (not a torch zip archive: truncated or another file)")
    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as err:  # damaged members, pickles of classes that no longer exist, ...
        raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "state_dict" not in state or "global_step" not in state:
        raise CheckpointError(f"{path}: not an sgexp training checkpoint (no state_dict/global_step)")
    return state


def checkpoint_step(path: str | Path) -> int:
    """The global step stored in a checkpoint (cheap: tensors are mapped, not read)."""
    return int(open_checkpoint(path)["global_step"])


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Every checkpoint file of a run directory (hpc checkpoints and ``checkpoints/*.ckpt``)."""
    return sorted([*run_dir.glob("hpc_ckpt_*.ckpt"), *(run_dir / "checkpoints").glob("*.ckpt")])


def newest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The run directory's state: its complete checkpoint with the highest stored step (None: none).

    Unreadable files are skipped with a warning that names them. Of the ``step-<N>.ckpt`` files only those
    whose name could beat the best step read so far are opened (their name is their step by construction,
    but the step used is the one read inside).
    """
    run_dir = Path(run_dir)
    files = checkpoint_files(run_dir)
    numbered = {p: int(m.group(1)) for p in files if (m := STEP_FILE.search(p.name))}
    best: Checkpoint | None = None
    # hpc checkpoints first: on a tie (a signal at a step that also wrote last.ckpt) the log names them
    named = sorted((p for p in files if p not in numbered), key=lambda p: not p.name.startswith("hpc_ckpt_"))
    order = named + sorted(numbered, key=numbered.get, reverse=True)
    for path in order:
        if path in numbered and best is not None and numbered[path] <= best.global_step:
            break  # the rest are named for earlier steps
        try:
            step = checkpoint_step(path)
        except CheckpointError as err:
            log.warning("skipping unusable checkpoint %s", err)
            continue
        if best is None or step > best.global_step:
            best = Checkpoint(path, step)
    return best


def describe_checkpoints(run_dir: Path) -> str:
    """'step-0000004.ckpt, last.ckpt' or 'none': what a failed load can point the user to."""
    return ", ".join(str(p.relative_to(run_dir)) for p in checkpoint_files(run_dir)) or "none"


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint file belongs to (``<run_dir>/checkpoints/x.ckpt`` or ``<run_dir>/hpc_*``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


# --------------------------------------------------------------------------- writing


def atomic_save(checkpoint: dict[str, Any], path: str | Path) -> bool:
    """Write ``checkpoint`` to ``path`` so that a kill at any moment leaves the old file or the new one.

    temp file in the same directory -> fsync -> rename over ``path`` -> fsync the directory (the rename
    itself must survive a node crash). Returns False, leaving ``path`` alone, if it holds a later step.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    step = checkpoint.get("global_step")
    if step is not None and path.exists():
        try:
            held = checkpoint_step(path)
        except CheckpointError:
            held = None  # a damaged file is replaced
        if held is not None and held > step:
            log.warning("not overwriting %s (step %d) with the older step %d", path, held, step)
            return False
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete temp files left by saves that were killed (only call while holding the run's lock)."""
    partial = [*run_dir.glob(".*.ckpt.tmp-*"), *(run_dir / "checkpoints").glob(".*.ckpt.tmp-*")]
    for path in partial:
        path.unlink(missing_ok=True)
    return partial


# --------------------------------------------------------------------------- same run?


IDENTITY = ("model", "routing", "data.name", "seed")  # what a checkpoint's weights depend on
# what the exact data stream depends on: a change is allowed on resume, with a warning
STREAM = (
    "data.batch_size",
    "data.global_batch_size",
    "data.num_workers",
    "data.shuffle_shards",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accumulate_grad_batches",
)


def _get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(_flatten(sub, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def config_differences(stored: dict, current: dict, keys: tuple[str, ...] = IDENTITY) -> list[str]:
    """``['model.name: checkpoint SiT-Micro/4, config SiT-Tiny/4', ...]`` for the keys that differ."""
    lines = []
    for key in keys:
        a, b = _flatten(_get(stored, key), key), _flatten(_get(current, key), key)
        for name in sorted(set(a) | set(b)):
            if a.get(name) != b.get(name):
                lines.append(f"{name}: checkpoint {a.get(name)!r}, config {b.get(name)!r}")
    return lines


def continue_from(run_dir: Path, named: Path | None, resume: str | None, config: dict, network: DiTConfig):
    """The checkpoint a training continues from (``Checkpoint``), or None for a fresh start.

    The module's rule: the run directory's newest complete checkpoint, whether or not ``resume`` was
    given, so a re-run or requeue of the same command never restarts at step 0. ``named`` (a checkpoint
    file given as ``resume``) older than the run directory's newest is refused: training from it would
    overwrite newer states. The checkpoint must be of the same run: model, routing, dataset and seed
    (``IDENTITY``); ``config`` is this training's resolved config, ``network`` its network.
    """
    newest = newest_checkpoint(run_dir)
    if named is not None:
        try:
            start = Checkpoint(named, checkpoint_step(named))
        except CheckpointError as err:
            raise fail("resume", resume, f"{err}. Checkpoints in {run_dir}: {describe_checkpoints(run_dir)}") from None
        if newest is not None and newest.global_step > start.global_step:
            newer = f"{newest} is newer and training from the older one would overwrite it"
            raise fail("resume", resume, f"it holds step {start.global_step}, but {newer}: resume={run_dir}")
    else:
        start = newest
        if start is None and resume:
            raise fail("resume", resume, f"no usable checkpoint in {run_dir} (files: {describe_checkpoints(run_dir)})")
    if start is not None:
        differences = checkpoint_differences(start.path, config, network)
        if differences:
            where = f"resume={resume!r}" if resume else f"paths.run_dir={str(run_dir)!r}"
            raise ValueError(
                f"{where} is invalid: {start.path} is a checkpoint of another run ({'; '.join(differences)}). "
                "Start the new run in another run directory, or resume with the checkpoint's config."
            )
    return start


def checkpoint_differences(path: Path, config: dict, network: DiTConfig) -> list[str]:
    """What differs between a checkpoint's run and this one (``model.name: checkpoint X, config Y``)."""
    state = open_checkpoint(path)
    stored = state.get(CONFIG_KEY)
    if stored is not None:
        changed = config_differences(stored, config, STREAM)
        if changed:
            log.warning("resuming with another data stream than %s's run (%s)", path.name, "; ".join(changed))
        return config_differences(stored, config)
    # written before checkpoints carried their config: compare the networks
    held = DiTConfig.from_dict(dict(state["hyper_parameters"]["model"])).to_dict()
    return config_differences({"network": held}, {"network": network.to_dict()}, keys=("network",))


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank zero, from the launcher's environment (before any process group
    exists): torchrun's RANK, srun's SLURM_PROCID, Lightning's LOCAL_RANK/NODE_RANK for the processes it
    starts itself."""
    return all(int(os.environ.get(var, 0) or 0) == 0 for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))
