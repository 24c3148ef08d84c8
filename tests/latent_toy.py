"""A toy latent dataset for tests: random 32px images, a tiny random AutoencoderKL, real shards.

Nothing downloads: the VAE is a diffusers ``AutoencoderKL`` built from a config
(3 blocks, widths 8/16/16: a factor-4 autoencoder, 32x32x3 images -> 4x8x8 latents),
seeded and saved with ``save_pretrained`` exactly as a downloaded one would be stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sgexp.data import prepare_folder

CLASSES = 3
PER_CLASS = 6
RESOLUTION = 32


def write_image_tree(root: Path, seed: int = 0, classes: int = CLASSES) -> Path:
    """``root/toy/c<k>/<i>.png``: smooth random RGB images of odd sizes (the prepare step crops them)."""
    rng = np.random.default_rng(seed)
    tree = root / "toy"
    for c in range(classes):
        (tree / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            coarse = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)  # a blurry blob: images a VAE can encode
            Image.fromarray(coarse).resize((40, 36), Image.Resampling.BICUBIC).save(tree / f"c{c}" / f"{i}.png")
    return tree


def save_tiny_vae(directory: Path, seed: int = 0) -> Path:
    """A random factor-4 AutoencoderKL with SD-VAE's scaling factor, saved as a diffusers directory."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            norm_num_groups=4,
            latent_channels=4,
            sample_size=RESOLUTION,
        )
    vae.save_pretrained(directory)
    return directory


def toy_image_dataset(root: Path, classes: int = CLASSES) -> Path:
    """``root/shards/toy``: 18 RGB 32x32 images in 3 classes (14 train / 4 val), 8 + 4 shards;
    6 images of each class for other ``classes`` (up to 10: the folder names c0..c9 sort as the labels)."""
    tree = write_image_tree(root / "tree", classes=classes)
    return prepare_folder(tree, RESOLUTION, root=root / "shards", val_fraction=0.2, workers=1)
