"""Evaluation sampling spread over processes (gloo, 2 ranks) equals one process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize, small_config

from sgexp.diffusion import Sampler, sparse_guidance
from sgexp.eval.export import merge_shards
from sgexp.eval.sampling import Setting, gather, rank_indices, sample_and_extract
from sgexp.models import DiT


class FlattenFeatures(torch.nn.Module):
    """A fixed random projection of the pixels: a real, deterministic feature map."""

    dim = 16
    num_classes = None

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, self.dim)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.proj.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.float().flatten(1) / 255.0)


def _score(num_samples: int, batch_size: int, npz: Path):
    """Features gathered, and the samples as an ADM npz (each rank its shard, rank 0 merges)."""
    model = randomize(DiT(small_config()), std=0.05).eval()
    setting = Setting("sg", sparse_guidance(3.0, 0.25, 0.75))
    scored = sample_and_extract(
        setting,
        {"main": model},
        Sampler("euler", 3),
        FlattenFeatures(),
        num_samples,
        (3, 8, 8),
        5,
        base_seed=3,
        batch_size=batch_size,
        grid_size=4,
        labels="uniform",
        npz=npz,
    )
    scored = gather(scored)  # a barrier too: every shard is closed
    if not dist.is_initialized() or dist.get_rank() == 0:
        merge_shards(npz, num_samples)
    return scored


def _worker(rank: int, world: int, port: int, num_samples: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        scored = _score(num_samples, batch_size=2, npz=Path(out).with_suffix(".npz"))
        if rank == 0:
            torch.save(scored, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_samples", [7, 1])  # 1 sample: more processes than samples
def test_two_processes_give_the_one_process_result(tmp_path, num_samples):
    out = str(tmp_path / "scored.pt")
    mp.start_processes(_worker, args=(2, _free_port(), num_samples, out), nprocs=2, start_method="spawn")
    together = torch.load(out, weights_only=False)
    alone = _score(num_samples, batch_size=5, npz=tmp_path / "alone.npz")
    assert together.indices.tolist() == alone.indices.tolist() == list(range(num_samples))
    assert np.array_equal(together.labels, alone.labels)
    np.testing.assert_allclose(together.features, alone.features, rtol=0, atol=1e-4)
    assert torch.equal(together.grid, alone.grid) or (together.grid.int() - alone.grid.int()).abs().max() <= 1
    with np.load(tmp_path / "scored.npz") as a, np.load(tmp_path / "alone.npz") as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (num_samples, 8, 8, 3)
        assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["labels"], alone.labels)
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # last-bit float differences


def test_rank_indices_cover_every_sample_once():
    parts = [rank_indices(10, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))
    assert rank_indices(1, 1, 2) == []
