"""ADM's TensorFlow Inception pipeline on clean-fid's ``inception-2015-12-05.pt``: one pass, three outputs.

ADM's evaluator (Dhariwal & Nichol 2021, openai/guided-diffusion ``evaluations/evaluator.py``) feeds
float images in 0..255 at their own size into TensorFlow's ``classify_image_graph_def.pb`` and reads

- ``pool_3:0`` (2048-d): FID (Heusel et al. 2017), precision/recall (Kynkäänniemi et al. 2019);
- ``mixed_6/conv:0[..., :7]`` (17x17x7 = 2023-d, flattened in TF's NHWC order): sFID (Nash et al. 2021);
- ``softmax(pool_3 @ W)`` with ``W`` the ``softmax/logits/MatMul`` weights and no bias: the Inception Score.

The graph itself resizes to 299x299 with TF1's ``resize_bilinear`` (``align_corners=False``, no half-pixel
centres: output pixel ``i`` samples input coordinate ``i * in / 299``, clamped at the border), then maps
``x -> (x - 128) / 128``. StyleGAN2-ADA's TorchScript port of that graph (the file clean-fid downloads and
runs in its ``legacy_tensorflow`` mode) does the same inside its ``forward``: ``affine_grid`` +
``grid_sample`` (bilinear, border padding) with a translation that turns PyTorch's half-pixel sampling
into TF1's, then ``layers`` (a chain ``conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed,
mixed_1, ..., mixed_10, pool2``), and ``output`` (Linear 2048 -> 1008) for the softmax.

``ADMInception`` re-runs that forward step by step so that one pass also yields ``mixed_6.conv``'s
output. What is *inferred* (from the TorchScript's printed code and the TF graph's node names; neither
the weights nor TensorFlow are on the machines this was written on): the child names, that
``layers.mixed_6.conv`` is TF's ``mixed_6/conv`` (conv + batch norm + ReLU, the first input of
``mixed_6/join``), the resize formula. What is *verified*, on the real file every time it is loaded
(``verify``, a fraction of a second): our resize + ``layers`` pass gives ``network(x, return_features=True)``,
our softmax gives ``network(x, no_output_bias=True)``, and our spatial features are the first 7 channels
of the ``mixed_6`` block's own output. A file that disagrees fails at load, naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sgexp.checks import fail

SIZE = 299  # the TF graph's input resolution
SPATIAL_BLOCK = "mixed_6"  # sFID reads mixed_6/conv: 17x17, 192 channels ...
SPATIAL_CHANNELS = 7  # ... of which ADM keeps the first 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
POOL_DIM = 2048


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # torch deprecates TorchScript, but the weights clean-fid and StyleGAN publish are a TorchScript file
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def tf1_resize_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TF1 ``resize_bilinear(align_corners=False)`` of float NCHW images to ``size`` x ``size``.

    ``affine_grid``/``grid_sample`` with ``align_corners=False`` sample output pixel ``i`` at input
    coordinate ``(i + 1/2) * in / size - 1/2`` (half-pixel centres); shifting the grid by
    ``1/in - 1/size`` (in [-1, 1] units) makes that ``i * in / size``, TF1's mapping; ``border``
    padding is TF1's clamp of ``i + 1`` at the last row/column. The arithmetic is done in float32
    tensor operations in the order the TorchScript does it, so that both round alike.
    """
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat(batch, 1, 1)
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ADMInception(nn.Module):
    """float images (B, 3, H, W) in 0..255, any size -> pool3 (B, 2048) and spatial (B, 2023) features."""

    def __init__(self, network: torch.jit.ScriptModule, path: str | Path):
        super().__init__()
        self.path = str(path)
        children = dict(network.layers.named_children()) if hasattr(network, "layers") else {}
        block = children.get(SPATIAL_BLOCK)
        if block is None or not hasattr(block, "conv") or not hasattr(network, "output"):
            raise fail(
                "weights",
                self.path,
                f"is not the TorchScript {SIZE}px Inception of clean-fid/StyleGAN2-ADA (inception-2015-12-05.pt):"
                f" it needs `layers.{SPATIAL_BLOCK}.conv` and `output`; layers has {list(children)}",
            )
        self.network = network
        self.chain = list(children.items())  # the order of layers.forward, checked by verify()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = (tf1_resize_bilinear(x.float()) - 128.0) / 128.0
        spatial = None
        for name, layer in self.chain:
            if name == SPATIAL_BLOCK:
                conv = layer.conv(h)[:, :SPATIAL_CHANNELS]  # TF's mixed_6/conv:0[..., :7]
                spatial = conv.permute(0, 2, 3, 1).reshape(len(x), -1)  # NHWC order, as ADM's mu_s/sigma_s
            h = layer(h)
        return h.reshape(len(x), POOL_DIM), spatial

    def logits(self, pool: np.ndarray) -> np.ndarray:
        """``pool3 @ W`` without the output bias (ADM's ``softmax/logits/MatMul``), float32 like ADM's."""
        weight = self.network.output.weight.detach().float().cpu().numpy()
        return np.asarray(pool, dtype=np.float32) @ weight.T

    @torch.no_grad()
    def verify(self) -> None:
        """Our step-by-step pass against the network's own ``forward`` on two random non-square images
        (so both axes' resize offsets matter); ``ValueError`` naming the file when they disagree.

        Tolerances (|ours - theirs| <= rtol |theirs| + atol max|theirs|) allow float32 rounding of
        the same operations, not a different resize, a kept bias or another branch."""
        images = torch.randint(0, 256, (2, 3, 41, 57), generator=torch.Generator().manual_seed(0)).float()
        pool, spatial = self(images)
        h = (tf1_resize_bilinear(images) - 128.0) / 128.0
        for name, layer in self.chain:
            if name == SPATIAL_BLOCK:
                block = layer(h)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(images), -1)
                break
            h = layer(h)
        checks = [  # what, ours, theirs, rtol, atol
            (
                "pool3 features (resize, normalisation, layers) against network(x, return_features=True)",
                pool,
                self.network(images, return_features=True).reshape(len(images), -1),
                1e-4,
                1e-4,
            ),
            (
                "softmax(pool3 @ output.weight) against network(x, no_output_bias=True)",
                torch.softmax(torch.from_numpy(self.logits(pool.numpy())).double(), dim=1).float(),
                self.network(images, no_output_bias=True),
                1e-3,  # relative: the bias's effect on a probability is relative
                1e-6,
            ),
            (
                f"{SPATIAL_BLOCK}.conv[:, :7] against the first 7 channels of {SPATIAL_BLOCK}'s output",
                spatial,
                block,
                1e-4,
                1e-4,
            ),
        ]
        for what, ours, theirs, rtol, atol in checks:
            if ours.shape != theirs.shape:
                raise fail("weights", self.path, f"{what}: shapes {tuple(ours.shape)} and {tuple(theirs.shape)}")
            excess = (ours - theirs).abs() - rtol * theirs.abs() - atol * float(theirs.abs().max())
            if not float(excess.max()) <= 0:  # also catches nan
                raise fail(
                    "weights",
                    self.path,
                    f"does not compute what ADM's TensorFlow pipeline is emulated as here: {what} differ by up to"
                    f" {float((ours - theirs).abs().max()):.3g} (rtol {rtol:g}, atol {atol:g} x max);"
                    " use clean-fid's inception-2015-12-05.pt",
                )
        if spatial.shape[1] != SPATIAL_DIM:
            raise fail(
                "weights", self.path, f"gives {spatial.shape[1]}-d spatial features, ADM's sFID uses {SPATIAL_DIM}"
            )


def load_adm_inception(path: str | Path) -> ADMInception:
    """The network at ``path`` as ``ADMInception``, checked against its own forward (``verify``)."""
    model = ADMInception(load_torchscript(path), path).eval().requires_grad_(False)
    model.verify()
    return model
