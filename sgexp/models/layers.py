"""Building blocks of the DiT/SiT backbone (Peebles & Xie, arXiv 2212.09748).

Each module does one thing. Shapes use B = batch, N = tokens, D = width,
K = tokens kept inside a route (K = N on the dense path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Sinusoidal features fed to the timestep MLP (DiT's choice).
TIMESTEP_FREQUENCIES = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-image shift and scale of every token. x (B, K, D), shift/scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of ``positions`` (M,) -> (M, dim), half sin, half cos."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int, column_first: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding, (grid_size², dim), row-major tokens.

    Half the channels encode the row, half the column (MAE/DiT convention); the
    table is computed in float64 and stored in float32. sgexp puts the row in the
    first half; ``column_first`` gives the official DiT/SiT/TREAD table.
    """
    if dim % 4 != 0:
        raise ValueError(f"hidden_size={dim} is invalid: the 2-D sin-cos embedding needs a multiple of 4")
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    halves = [sincos_1d(dim // 2, rows.flatten()), sincos_1d(dim // 2, cols.flatten())]
    emb = torch.cat(halves[::-1] if column_first else halves, dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens: (B, C, H, W) -> (B, N, D), N = (H/p)·(W/p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H/p, W/p) -> (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar t ∈ [0, 1] -> (B, D): sinusoidal features, then a 2-layer MLP.

    Flow-matching time is continuous in [0, 1]; it is multiplied by 1000 so the
    sinusoid frequencies (periods up to 10,000) resolve it as finely as they
    resolve DDPM's integer timesteps.
    """

    def __init__(self, hidden_size: int, frequency_size: int = TIMESTEP_FREQUENCIES, time_scale: float = 1000.0):
        super().__init__()
        self.frequency_size = frequency_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = (t.float() * self.time_scale)[:, None] * freqs[None, :]  # (B, half)
        features = torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D), with an extra "null" row at index ``num_classes``.

    While training, each label is replaced by the null label with probability
    ``dropout_prob`` (classifier-free guidance training), so one checkpoint
    provides both D(c) and D(∅). Outside training nothing is dropped; a sampler
    asks for D(∅) by passing the null index itself.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def drop(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """Labels after dropout (training mode only; the labels themselves otherwise).

        ``generator``: one for the batch or one per image. A separate step from the lookup
        so that the draw stays outside a compiled region (``sgexp.models.compiled``).
        """
        if not (self.training and self.dropout_prob > 0):
            return labels
        if generator is None or isinstance(generator, torch.Generator):
            device = generator.device if generator is not None else labels.device
            u = torch.rand(labels.shape, generator=generator, device=device)
        else:
            u = torch.cat([torch.rand(1, generator=g, device=g.device) for g in generator])
        drop = u.to(labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def forward(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        """labels (B,) -> (B, D), after ``drop``."""
        return self.table(self.drop(labels, generator))


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, K, D = x.shape
        qkv = self.qkv(x).view(B, K, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, K, D/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, K, D))


class Mlp(nn.Module):
    """Position-wise feed-forward: D -> ratio·D -> D with tanh-approximated GELU."""

    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning.

    The conditioning vector c (timestep + label embedding) produces, per image,
    a shift, a scale and a residual gate for each of the two sub-layers. The
    gates start at zero (see ``DiT.initialize_weights``), so every block starts
    as the identity. Because the modulation is per image, a routed block works
    unchanged on any subset of tokens.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x (B, K, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its p×p×C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p·p·C)
