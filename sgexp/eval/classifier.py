"""The project's own small CNN classifier: the feature network of the *domain FID*.

Why a classifier of our own: Inception-V3 was trained on 299x299 ImageNet photos;
on 28x28 grey digits upsampled tenfold its features mostly describe the
upsampling, and its weights cannot be downloaded on the machines this project
runs on. A small CNN trained on the dataset itself gives features that separate
what matters in that domain (the digits' shapes and classes), the same idea as
the "FID with a domain classifier" used for MNIST-scale generative models.

Architecture (any channels / resolution / classes, read from ``meta.json``)::

    conv5x5(C->16) BN ReLU maxpool2 | conv5x5(16->32) BN ReLU maxpool2
    | adaptive avg pool to g x g (g = min(7, R//4), the identity at 28x28)
    | linear(32*g*g -> 128) ReLU  <- the features (penultimate layer, post-activation)
    | dropout | linear(128 -> num_classes)

Inputs are uint8 images normalised exactly as the diffusion model sees them
(``x / 127.5 - 1``, the data pipeline's convention), in training and in use.

``train_classifier`` writes ``<dataset_dir>/classifier.pt`` (weights + config) and
``<dataset_dir>/classifier.json`` (validation accuracy, epochs, seconds, date, ...).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sgexp.checks import check_positive_int, fail
from sgexp.data import read_meta, read_split

log = logging.getLogger("sgexp.eval.classifier")

CHECKPOINT = "classifier.pt"
SIDECAR = "classifier.json"
NORMALISATION = "x / 127.5 - 1"  # recorded in the checkpoint; the one place it is applied is `normalise`


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) images -> float32 in [-1, 1], as the training data pipeline produces."""
    return images.float() / 127.5 - 1.0


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int
    resolution: int
    num_classes: int
    width: int = 32
    features: int = 128
    dropout: float = 0.25

    @property
    def grid(self) -> int:
        # two 2x poolings leave R/4; pool further down to at most 7x7 so large images
        # do not blow up the linear layer, and never below 1x1 for tiny ones
        return max(1, min(7, self.resolution // 4))


class SmallCNN(nn.Module):
    """Two conv blocks + a 128-feature penultimate layer + a linear head (see the module docstring)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w, g = config.width, config.grid
        self.trunk = nn.Sequential(
            nn.Conv2d(config.in_channels, w // 2, 5, padding=2),
            nn.BatchNorm2d(w // 2),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w // 2, w, 5, padding=2),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(g),
            nn.Flatten(),
            nn.Linear(w * g * g, config.features),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.features, config.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, C, R, R) -> (features (B, 128), logits (B, num_classes)), one pass."""
        features = self.trunk(x)
        return features, self.head(self.dropout(features))


# ----------------------------------------------------------------------------- training


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, zero-filled.

    Digits are centred by construction; small shifts are the cheapest augmentation
    that makes the classifier (and so the FID) tolerant of slightly off-centre samples.
    """
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # -1 is black after normalisation
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on uint8 images."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        _, logits = model(normalise(images[start : start + batch_size].to(device)))
        correct += int((logits.argmax(1).cpu() == labels[start : start + batch_size]).sum())
    return correct / max(1, len(images))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def train_classifier(
    dataset_dir: str | Path,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_seconds: float | None = None,
) -> dict:
    """Train the SmallCNN on the train split, validate on the val split, save checkpoint + sidecar.

    AdamW with a one-cycle schedule over ``epochs`` (short runs converge fastest with
    it); ``max_seconds`` stops after the epoch that crosses the wall-clock limit.
    All randomness comes from ``seed`` inside ``torch.random.fork_rng``, so the
    caller's global RNG is untouched. Returns the sidecar's content.
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if not lr > 0:
        raise fail("lr", lr, "learning rate must be > 0")
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    if meta.get("format") == "latent":
        raise fail("dataset_dir", str(dataset_dir), f"holds latents: train on its image dataset {meta['source']}")
    x_train, y_train = read_split(dataset_dir, "train")
    x_val, y_val = read_split(dataset_dir, "val")
    if len(x_train) == 0 or len(x_val) == 0:
        raise fail("dataset_dir", str(dataset_dir), "needs a non-empty train and val split to train a classifier")
    config = ClassifierConfig(meta["channels"], meta["resolution"], meta["num_classes"])
    max_shift = round(config.resolution / 14)  # 2 px on 28x28 MNIST, 1 px on 8x8 digits
    steps_per_epoch = -(-len(x_train) // batch_size)
    device = torch.device(device)
    log.info(
        "training the %s classifier: %d train / %d val images, %d epochs of %d steps, shifts of <= %d px",
        meta["name"],
        len(x_train),
        len(x_val),
        epochs,
        steps_per_epoch,
        max_shift,
    )

    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = SmallCNN(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
        done = 0
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            total_loss = 0.0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                x = random_shift(normalise(x_train[idx]), max_shift, generator).to(device)
                _, logits = model(x)
                loss = F.cross_entropy(logits, y_train[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total_loss += loss.item()
            done = epoch + 1
            val_acc = accuracy(model, x_val, y_val)
            elapsed = time.perf_counter() - start
            log.info(
                "epoch %d/%d: loss %.4f, val accuracy %.4f (%.0f s)",
                done,
                epochs,
                total_loss / steps_per_epoch,
                val_acc,
                elapsed,
            )
            if max_seconds is not None and elapsed > max_seconds and done < epochs:
                log.warning("stopping after %d of %d epochs: max_seconds=%s reached", done, epochs, max_seconds)
                break
    seconds = time.perf_counter() - start

    path = dataset_dir / CHECKPOINT
    checkpoint = {
        "config": asdict(config),
        "state_dict": model.cpu().state_dict(),
        "normalisation": NORMALISATION,
        "dataset": meta["name"],
    }
    tmp = path.with_name(path.name + ".tmp")  # atomic: a crash never leaves a half-written classifier
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    info = {
        "dataset": meta["name"],
        "val_accuracy": val_acc,
        "epochs": done,
        "seconds": round(seconds, 1),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "n_train": len(x_train),
        "n_val": len(x_val),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "normalisation": NORMALISATION,
        "architecture": asdict(config),
        "sha256": file_sha256(path),
    }
    (dataset_dir / SIDECAR).write_text(json.dumps(info, indent=2) + "\n")
    log.info("saved %s (val accuracy %.4f, %.0f s)", path, val_acc, seconds)
    return info


def load_classifier(path: str | Path, meta: dict) -> SmallCNN:
    """A trained SmallCNN in eval mode; checks that it was trained for images like ``meta``'s."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = ClassifierConfig(**checkpoint["config"])
    want = (meta["channels"], meta["resolution"], meta["num_classes"])
    got = (config.in_channels, config.resolution, config.num_classes)
    if got != want:
        raise fail(
            "classifier",
            str(path),
            f"was trained on (channels, resolution, classes)={got} but the dataset {meta['name']} has {want};"
            f" retrain it with `python -m sgexp.data classifier {meta['name']}`",
        )
    model = SmallCNN(config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
