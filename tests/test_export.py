"""Samples for ADM's evaluator (``save_npz``), uniform labels, and the progress display."""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config, compose_train, digits_run, randomize, small_config

from sgexp import progress
from sgexp.diffusion import Sampler, cfg, generate, sparse_guidance
from sgexp.diffusion.seeds import sample_labels
from sgexp.eval.export import ShardWriter, merge_shards, shard_dir
from sgexp.eval.sampling import Setting, rank_indices, sample_and_extract, score_setting, to_uint8
from sgexp.models import DiT

SHAPE = (3, 8, 8)


@pytest.fixture
def models():
    return {"main": randomize(DiT(small_config()), std=0.05).eval()}


def read_like_adm(path: Path) -> tuple[tuple, np.dtype]:
    """What ADM's ``open_npz_array`` checks before streaming ``arr_0``: a 1.0/2.0 header, C order."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        assert np.lib.format.read_magic(member) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        assert not fortran
        return shape, dtype


def test_npz_round_trips_in_index_order(tmp_path, models):
    """One process: arr_0 is the samples (uint8, N×H×W×3) in index order, with their labels."""
    setting, n = Setting("sg", sparse_guidance(3.0, 0.25, 0.75)), 11
    configs = {"main": small_config()}
    npz = tmp_path / "sg.npz"
    row, scored = score_setting(
        setting,
        models,
        configs,
        Sampler("euler", 2),
        None,
        None,
        n,
        base_seed=5,
        batch_size=4,
        grid_size=n,
        labels="uniform",
        npz=npz,
    )
    assert row["npz"] == "sg.npz" and row["labels"] == "uniform"
    assert not shard_dir(npz).exists()  # merged and cleaned up
    assert read_like_adm(npz) == ((n, 8, 8, 3), np.dtype(np.uint8))
    with np.load(npz) as z:
        assert z.files == ["arr_0", "labels"]
        images, labels = z["arr_0"], z["labels"]
    assert images.dtype == np.uint8 and images.shape == (n, 8, 8, 3)
    assert np.array_equal(images, scored.grid.permute(0, 2, 3, 1).numpy())  # the grid keeps samples in index order
    assert np.array_equal(labels, sample_labels(range(n), 5, 5, "uniform").numpy())
    samples, _ = generate(Sampler("euler", 2), setting.rule, models, [7], SHAPE, 5, 5, label_mode="uniform")
    assert np.abs(images[7].astype(int) - to_uint8(samples)[0].permute(1, 2, 0).numpy()).max() <= 1


def test_latent_samples_are_exported_decoded(tmp_path):
    """A latent model's npz holds the decoded images the extractor sees, not the latents."""
    latent = {"main": randomize(DiT(small_config(in_channels=4)), std=0.05).eval()}

    def decode(z):  # a stand-in decoder: 4×8×8 latents -> 3×16×16 images in [-1, 1]
        return torch.tanh(z[:, :3]).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)

    npz = tmp_path / "cfg.npz"
    configs = {"main": small_config(in_channels=4)}
    row, scored = score_setting(
        Setting("cfg", cfg(2.0)),
        latent,
        configs,
        Sampler("euler", 1),
        None,
        None,
        3,
        decode=decode,
        grid_size=3,
        npz=npz,
    )
    with np.load(npz) as z:
        assert z["arr_0"].shape == (3, 16, 16, 3)
        assert np.array_equal(z["arr_0"], scored.grid.permute(0, 2, 3, 1).numpy())


def _write_ranks(path: Path, samples: torch.Tensor, labels: torch.Tensor, world: int, batch: int) -> Path:
    """What ``world`` ranks write: each its ``rank_indices`` share, batch by batch, then one merge."""
    for rank in range(world):
        mine = rank_indices(len(samples), rank, world)
        writer = ShardWriter(path, rank, len(mine))
        for start in range(0, len(mine), batch):
            part = mine[start : start + batch]
            writer.add(part, samples[part], labels[part])
        writer.close()
    return merge_shards(path, len(samples))


def test_two_ranks_merge_to_what_one_process_writes(tmp_path):
    grey = {"main": randomize(DiT(small_config(in_channels=1)), std=0.05).eval()}  # MNIST-like: one channel
    samples, labels = generate(Sampler("euler", 2), cfg(2.0), grey, range(9), (1, 8, 8), 5, 3)
    images = to_uint8(samples)
    one = _write_ranks(tmp_path / "one.npz", images, labels, world=1, batch=9)
    two = _write_ranks(tmp_path / "two.npz", images, labels, world=2, batch=2)
    assert one.read_bytes() == two.read_bytes()  # the same file, byte for byte
    with np.load(one) as z:
        assert z["arr_0"].shape == (9, 8, 8, 3)
        assert np.array_equal(z["arr_0"], images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy())  # grey -> RGB
        assert np.array_equal(z["labels"], labels.numpy())
    three = _write_ranks(tmp_path / "three.npz", images[:2], labels[:2], world=3, batch=1)  # a rank without samples
    with np.load(three) as z:
        assert z["arr_0"].shape == (2, 8, 8, 3)


def test_merge_refuses_missing_or_duplicate_samples(tmp_path, models):
    path = tmp_path / "x.npz"
    writer = ShardWriter(path, 0, 2)
    samples, y = generate(Sampler("euler", 1), cfg(2.0), models, [0, 1], SHAPE, 5)
    writer.add([0, 1], to_uint8(samples), y)
    writer.close()
    with pytest.raises(ValueError, match="npz=.* hold 2 indices, not each of 0..2 once"):
        merge_shards(path, 3)
    assert not path.exists()


def test_uniform_labels_are_uniform_per_index_and_not_balanced(models):
    uniform = sample_labels(range(5000), 10, 0, "uniform").numpy()
    counts = np.bincount(uniform, minlength=10)
    chi2 = ((counts - 500) ** 2 / 500).sum()
    assert chi2 < 27.9  # 9 degrees of freedom, p = 0.001
    balanced = sample_labels(range(5000), 10, 0, "balanced").numpy()
    assert (uniform != balanced).mean() > 0.8
    # Same label for sample i whatever the setting and the batch size.
    runs = [
        sample_and_extract(Setting(name, rule), models, Sampler("euler", 1), None, 9, SHAPE, 5, 4, batch, labels=mode)
        for name, rule, batch, mode in (
            ("cfg", cfg(2.0), 9, "uniform"),
            ("sg", sparse_guidance(3.0, 0.25, 0.75), 2, "uniform"),
            ("cfg", cfg(2.0), 4, "balanced"),
        )
    ]
    assert np.array_equal(runs[0].labels, runs[1].labels)
    assert np.array_equal(runs[0].labels, sample_labels(range(9), 5, 4, "uniform").numpy())
    assert runs[2].labels.tolist() == [i % 5 for i in range(9)]
    with pytest.raises(ValueError, match="labels='random' is invalid"):
        sample_and_extract(Setting("cfg", cfg(2.0)), models, Sampler("euler", 1), None, 2, SHAPE, 5, labels="random")


def test_progress_writes_lines_when_not_a_terminal(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="sgexp.progress")
    with progress.track("sampling sg", total=100, terminal=False) as advance:
        for _ in range(15):
            advance(7)  # 105 > 100 is tolerated
    lines = [r.getMessage() for r in caplog.records]
    assert 9 <= len(lines) <= 11  # one per tenth
    assert lines[-1].startswith("sampling sg: 105/100 samples") and "samples/s" in lines[-1] and "ETA" in lines[-1]
    # A slow pass still says something every 30 s.
    now = [0.0]
    slow = progress.LineProgress("slow", total=1000, unit="samples", clock=lambda: now[0])
    caplog.clear()
    for _ in range(4):
        now[0] += 31.0
        slow.advance(1)
    assert len(caplog.records) == 4 and "ETA 8:" in caplog.records[-1].getMessage()  # 996 left at 1/31 s
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # only rank 0 displays
    with progress.track("other rank", total=10, terminal=False) as advance:
        advance(10)
    assert not caplog.records
    monkeypatch.setenv("RANK", "0")
    with progress.track("bar", total=10, terminal=True) as advance:  # the rich bar, off a real terminal here
        advance(10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The fixture of tests/test_evaluate.py: a digits model trained for a few steps and its classifier."""
    from sgexp.data import ensure_prepared
    from sgexp.train import run as train

    tmp = tmp_path_factory.mktemp("export")
    shards = tmp / "shards"
    ensure_prepared("digits", shards)
    classifier = [sys.executable, "-m", "sgexp.data", "classifier", "digits", "--root", str(shards)]
    subprocess.run(classifier, check=True, cwd=ROOT, capture_output=True)
    result = train(
        compose_train(digits_run(tmp, shards, "trainer.max_steps=10", "callbacks.guided_eval.num_samples=10"))
    )
    return tmp, shards, result


@pytest.mark.slow  # the fixture trains a model and its classifier: 80-100 s on 2 busy cores
def test_evaluate_saves_npz_per_setting(trained):
    from sgexp.evaluate import run as evaluate

    tmp, shards, result = trained
    overrides = [
        f"checkpoint={result.checkpoint}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp / 'runs'}",
        f"out_dir={tmp / 'eval'}",
        "logger.enabled=false",
        "guidance=[cfg,sg]",
        "num_samples=30",
        "batch_size=16",
        "sampler.steps=2",
        "grid_size=0",
        "labels=uniform",
        "save_npz=true",
    ]
    results = evaluate(compose_config("evaluate", overrides))
    for row in results["rows"]:
        assert row["labels"] == "uniform" and row["npz"] == f"{row['setting']}.npz"
        with np.load(tmp / "eval" / row["npz"]) as z:
            assert z["arr_0"].shape == (30, 8, 8, 3) and z["arr_0"].dtype == np.uint8
            assert np.array_equal(z["labels"], sample_labels(range(30), 10, 0, "uniform").numpy())
    with np.load(tmp / "eval" / "cfg.npz") as a, np.load(tmp / "eval" / "sg.npz") as b:
        assert np.array_equal(a["labels"], b["labels"]) and not np.array_equal(a["arr_0"], b["arr_0"])
