"""``prepare latents``: SD-VAE latent shards from image shards (real diffusers AutoencoderKL, tiny and
random), resumption, rank/worker placement, the reader's view of meta.json, the VAE wrapper, bad input."""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from latent_toy import save_tiny_vae, toy_image_dataset

import sgexp.vae
from sgexp.data import ShardDataModule, read_meta, read_split
from sgexp.data.__main__ import main as data_cli
from sgexp.data.bad_samples import BadSamples
from sgexp.data.latent_format import decode_array
from sgexp.data.latents import prepare_latents
from sgexp.data.shards import shard_urls, split_pipeline
from sgexp.vae import load_vae, vae_for_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(image dataset, VAE directory, latent dataset with flipped views), encoded once."""
    root = tmp_path_factory.mktemp("latents")
    images = toy_image_dataset(root)
    vae = save_tiny_vae(root / "vae")
    latents = prepare_latents(images, str(vae), batch_size=4, flip=True, device="cpu", workers=1)
    return images, vae, latents


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- what is written


def test_meta_mirrors_the_images_and_records_the_vae(toy):
    images, vae_dir, latents = toy
    meta, image_meta = read_meta(latents), read_meta(images)
    assert latents == images.parent / "toy_latents"
    assert (meta["format"], meta["channels"], meta["resolution"]) == ("latent", 4, 8)  # 32px / factor 4
    assert meta["latent"]["scale"] == pytest.approx(0.18215) and meta["latent"]["shift"] == 0.0
    assert meta["latent"]["views"] == ["image", "hflip"] and meta["latent"]["dtype"] == "float16"
    vae = load_vae(str(vae_dir))
    assert meta["vae"]["source"] == str(vae_dir.resolve()) and meta["vae"]["identity"] == vae.identity
    assert meta["images"]["dataset"] == str(images.resolve()) and meta["images"]["channels"] == 3
    for key in ("num_train", "num_val", "train_shards", "val_shards", "shard_samples", "num_classes", "class_names"):
        assert meta[key] == image_meta[key], key
    assert sorted(p.name for p in latents.glob("*.tar")) == sorted(p.name for p in images.glob("*.tar"))
    assert "prepare_latents(" in meta["command"] and json.loads((latents / "encoding.json").read_text())


def test_stored_moments_are_the_vae_posterior_of_each_image_and_its_mirror(toy):
    images, vae_dir, latents = toy
    pixels, labels = read_split(images, "train")  # uint8 (14, 3, 32, 32), shard order
    moments, latent_labels = read_split(latents, "train")  # float32 (14, 2, 4, 8, 8): [mean, std] of view 0
    assert moments.shape == (14, 2, 4, 8, 8) and torch.equal(labels, latent_labels)
    vae = load_vae(str(vae_dir))
    x = pixels.float() / 127.5 - 1
    mean, std = vae.encode_moments(x)
    torch.testing.assert_close(moments[:, 0], mean, atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(moments[:, 1], std, atol=2e-3, rtol=2e-3)
    # view 1 (read from the tar itself) is the encoding of the mirror image, not the mirrored latent
    meta = read_meta(images)
    batches = split_pipeline(shard_urls(images, meta, "train"), meta, 64, BadSamples(True))
    keyed = {k: img for imgs, _, keys in batches for k, img in zip(keys, imgs, strict=True)}
    with tarfile.open(latents / "train-000000.tar") as tar:
        means = [m for m in tar if m.name.endswith(".mean.npy")]
        stored = {m.name.split(".")[0]: decode_array(tar.extractfile(m).read()) for m in means}
    assert stored and all(a.shape == (2, 4, 8, 8) and a.dtype == np.float16 for a in stored.values())
    x = torch.from_numpy(np.stack([keyed[k] for k in stored])).float() / 127.5 - 1
    mirrored, _ = vae.encode_moments(x.flip(-1))
    stored_mirror = torch.from_numpy(np.stack([a[1] for a in stored.values()])).float()
    torch.testing.assert_close(stored_mirror, mirrored, atol=2e-3, rtol=2e-3)
    assert not torch.allclose(mirrored, vae.encode_moments(x)[0].flip(-1), atol=1e-2)


def test_decode_inverts_the_scale_and_maps_to_images(toy):
    _, vae_dir, latents = toy
    vae = vae_for_dataset(read_meta(latents))
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = vae.decode(z)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32 and images.abs().max() <= 1
    expected = vae.autoencoder.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(images, expected)
    assert vae_for_dataset({"format": "png"}) is None  # image datasets need no decoder


# ----------------------------------------------------------------------------- resuming and placement


def test_interrupted_encoding_resumes_only_the_missing_shards(toy, tmp_path, caplog):
    images, vae_dir, latents = toy
    out = copy_dataset(latents, tmp_path / "toy_latents")
    (out / "meta.json").unlink()  # as if interrupted: two shards missing, one half-written temporary
    for name in ("train-000003.tar", "val-000001.tar"):
        (out / name).unlink()
    (out / "train-000003.tar.12345.tmp").write_bytes(b"half a tar")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    with caplog.at_level(logging.INFO, logger="sgexp.progress"):  # off a terminal: lines, not a bar
        prepare_latents(images, str(vae_dir), out, batch_size=4, flip=True, device="cpu", workers=1)
    assert (out / "meta.json").exists() and not list(out.glob("*.tmp"))
    done = re.findall(r"encoding toy_latents: (\d+)/(\d+) images \(100%\)", caplog.text)
    assert done and done[-1][0] == done[-1][1], caplog.text  # the two missing shards' images, all of them
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in kept} == kept  # untouched
    for shard in latents.glob("*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name  # deterministic, same bytes
    # a different encoding is refused rather than mixed in, until --force
    with pytest.raises(ValueError, match=r"out=.*encoded differently.*latent.*--force"):
        prepare_latents(images, str(vae_dir), out, batch_size=4, flip=False, device="cpu", workers=1)
    prepare_latents(images, str(vae_dir), out, batch_size=4, flip=False, device="cpu", workers=1, force=True)
    assert read_meta(out)["latent"]["views"] == ["image"]


def test_ranks_split_the_shards_and_the_last_writes_meta(toy, tmp_path):
    images, vae_dir, latents = toy
    out = tmp_path / "ranked"
    names = read_meta(images)["train_shards"] + read_meta(images)["val_shards"]
    prepare_latents(images, str(vae_dir), out, batch_size=4, flip=True, device="cpu", rank=1, world_size=2)
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(names[1::2]) and not (out / "meta.json").exists()
    prepare_latents(images, str(vae_dir), out, batch_size=4, flip=True, device="cpu", rank=0, world_size=2)
    assert (out / "meta.json").exists() and len(list(out.glob("*.tar"))) == len(names)
    for name in names:
        assert (out / name).read_bytes() == (latents / name).read_bytes()
    with pytest.raises(ValueError, match="rank=2 is invalid"):
        prepare_latents(images, str(vae_dir), out, rank=2, world_size=2, device="cpu")


def test_worker_processes_encode_the_same_latents(toy, tmp_path):
    images, vae_dir, latents = toy
    out = prepare_latents(images, str(vae_dir), tmp_path / "pool", batch_size=4, flip=True, device="cpu", workers=2)
    for split in ("train", "val"):
        ours, labels = read_split(out, split)
        theirs, their_labels = read_split(latents, split)
        assert torch.equal(labels, their_labels)
        torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)  # thread counts change float rounding


# ----------------------------------------------------------------------------- reading: meta.json's word


def test_datamodule_gives_scaled_latents_with_fresh_noise_and_honours_meta(toy, tmp_path):
    _, _, latents = toy
    dm = ShardDataModule(str(latents), batch_size=4, num_workers=0, hflip=True, seed=3)
    assert (dm.latent, dm.channels, dm.resolution) == (True, 4, 8)
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    moments, _ = read_split(latents, "val")
    torch.testing.assert_close(val, 0.18215 * moments[:, 0], rtol=0, atol=0)  # validation: the posterior mean
    train = [x.clone() for (x, _), _ in zip(dm.train_dataloader(), range(6), strict=False)]
    assert all(x.shape == (4, 4, 8, 8) and x.dtype == torch.float32 for x in train)
    # a posterior sample, not the mean: noise of std ~ scale * std (the random VAE's std is ~1)
    assert 0.1 < torch.cat(train).std() / 0.18215 < 3

    # another scale in meta.json: the same stream (seeds), scaled by meta.json's number
    other = copy_dataset(latents, tmp_path / "rescaled")
    meta = read_meta(other)
    meta["latent"]["scale"] = 2 * meta["latent"]["scale"]
    (other / "meta.json").write_text(json.dumps(meta))
    dm2 = ShardDataModule(str(other), batch_size=4, num_workers=0, hflip=True, seed=3)
    again = [x for (x, _), _ in zip(dm2.train_dataloader(), range(6), strict=False)]
    for a, b in zip(train, again, strict=True):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)

    # resuming at batch 3 replays batches 3, 4, 5: the same images, flips and noise
    dm.set_start_batch(3)
    tail = [x for (x, _), _ in zip(dm.train_dataloader(), range(3), strict=False)]
    for a, b in zip(train[3:], tail, strict=True):
        assert torch.equal(a, b)


def test_global_batch_size_is_split_over_devices(toy):
    dm = ShardDataModule(str(toy[2]), batch_size=4, num_workers=0)
    assert dm.set_global_batch_size(256, world_size=32) == 8 and dm.val_batch_size == 8  # 4 nodes x 8 GPUs
    assert dm.set_global_batch_size(256, world_size=1, accumulate=4) == 64  # 1 GPU, 4 micro-batches
    with pytest.raises(ValueError, match=r"global_batch_size=256 is invalid: .* 3 x 1"):
        dm.set_global_batch_size(256, world_size=3)


def test_hflip_needs_flipped_latents(toy, tmp_path):
    images, vae_dir, _ = toy
    out = prepare_latents(images, str(vae_dir), tmp_path / "noflip", batch_size=8, device="cpu", workers=1)
    with pytest.raises(ValueError, match=r"hflip=True is invalid: .*noflip.*--flip"):
        ShardDataModule(str(out), batch_size=4, hflip=True)
    ShardDataModule(str(out), batch_size=4, hflip=False)


# ----------------------------------------------------------------------------- bad input and the CLI


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(vae="nowhere/at-all"), FileNotFoundError, "vae='nowhere/at-all': no such directory.*hf download"),
        (dict(vae="/no/such/vae"), ValueError, "vae='/no/such/vae' is invalid"),
        (dict(batch_size=0), ValueError, "batch_size=0 is invalid"),
        (dict(dtype="int8"), ValueError, "dtype='int8' is invalid"),
        (dict(workers=0), ValueError, "workers=0 is invalid"),
        (dict(device="tpu"), ValueError, "device='tpu' is invalid"),
        (dict(scale=-1.0), ValueError, "scale=-1.0 is invalid"),
    ],
)
def test_bad_input_fails_before_any_work(toy, tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.setattr(sgexp.vae, "internet_reachable", lambda url, timeout=3.0: False)
    images, vae_dir, _ = toy
    args = dict(images=images, vae=str(vae_dir), out=tmp_path / "out", device="cpu") | kwargs
    with pytest.raises(error, match=match):
        prepare_latents(**args)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_datasets_are_named(toy, tmp_path):
    images, vae_dir, latents = toy
    with pytest.raises(ValueError, match="images=.*already a latent dataset"):
        prepare_latents(latents, str(vae_dir), tmp_path / "x", device="cpu")
    with pytest.raises(FileNotFoundError, match="meta.json does not exist"):
        prepare_latents(tmp_path, str(vae_dir), tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="vae=.*holds a diffusers UNet2DModel"):
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
        load_vae(str(tmp_path / "unet"))
    other = save_tiny_vae(tmp_path / "other_vae", seed=1)
    with pytest.raises(ValueError, match="vae=.*other_vae.*has weights .* encoded with"):
        vae_for_dataset(read_meta(latents), str(other))


def test_cli(toy, capsys):
    images, vae_dir, latents = toy
    prepare = ["prepare", "latents", "--images", str(images), "--vae", str(vae_dir)]
    data_cli([*prepare, "--flip", "--device", "cpu", "--batch-size", "4"])
    assert capsys.readouterr().out.strip() == str(latents)  # already prepared: nothing to do
    with pytest.raises(SystemExit) as exit_info:
        data_cli([*prepare, "--batch-size", "0"])
    assert exit_info.value.code == 2 and "batch_size=0 is invalid" in capsys.readouterr().err


def test_only_the_vae_module_imports_diffusers_and_only_when_called():
    """sgexp works without diffusers: it is imported in sgexp/vae.py alone, inside functions."""
    found = []
    for path in sorted((ROOT / "sgexp").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "diffusers" for n in names):
                found.append((path.relative_to(ROOT).as_posix(), id(node) in top))
    assert found and all(where == ("sgexp/vae.py", False) for where in found), found


def test_vae_checks_its_inputs(toy):
    vae = load_vae(str(toy[1]))
    with pytest.raises(ValueError, match="images=.*must be a float tensor"):
        vae.encode_moments(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images=.*multiples of 4"):
        vae.encode_moments(torch.zeros(1, 3, 30, 30))
    with pytest.raises(ValueError, match="latents=.*4, H, W"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    assert np.isclose(vae.scale, 0.18215) and vae.downsample == 4
