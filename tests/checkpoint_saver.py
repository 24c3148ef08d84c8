"""A process that only writes checkpoints, for the SIGKILL test of tests/test_restart.py (a module of its
own: the forkserver's children import it, and it must not pull in Lightning, MLflow or Hydra)."""

from __future__ import annotations

from pathlib import Path

import torch

from sgexp import runs


def save_forever(run_dir: Path, started) -> None:
    """A process that only saves checkpoints, resuming after the newest good one (killed by the test)."""
    newest = runs.newest_checkpoint(run_dir)
    step = newest.global_step + 1 if newest else 0
    weights = torch.arange(3_000_000, dtype=torch.float32)  # 12 MB: a save takes a while, kills land inside it
    started.put(step)
    while True:
        state = {"global_step": step, "state_dict": {"w": weights}}
        runs.atomic_save(state, run_dir / "checkpoints" / "last.ckpt")
        if step % 3 == 0:
            runs.atomic_save(state, run_dir / "checkpoints" / f"step-{step:07d}.ckpt")
        step += 1
