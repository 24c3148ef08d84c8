"""TREAD-routed DiT/SiT backbone and its size registry.

DiT (Peebles & Xie, arXiv 2212.09748) and SiT (Ma et al., arXiv 2401.08740)
share this architecture; they differ in the training objective, which lives in
``sgexp.diffusion``. Here the network predicts the flow-matching velocity, so
the output has as many channels as the input. ``DiT-XL/2`` and ``SiT-XL/2``
name the same network.

Routes (``sgexp.models.routing``) let a random subset of tokens skip a span of
blocks. The forward pass takes the sparsity γ to run at, so one set of weights
serves dense sampling (γ=0), TREAD training (γ_train) and both branches of
Sparse Guidance (γ_strong < γ_weak).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sgexp.checks import check_choice, check_positive_int, check_sparsity, fail
from sgexp.models.compiled import compiled
from sgexp.models.layers import DiTBlock, FinalLayer, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d
from sgexp.models.routing import (
    Generators,
    Route,
    check_routes,
    choose_tokens,
    kept_tokens,
    resolve_sparsity,
    route,
    unroute,
)


@dataclass(frozen=True)
class ModelSize:
    """Depth / width / heads of a registry entry, and its default TREAD route."""

    depth: int
    hidden_size: int
    num_heads: int
    route: tuple[int, int]


# Paper sizes follow DiT; their default route is TREAD's 2 -> L-4. The two small
# sizes train in minutes on 2 CPU cores; their route leaves one dense block on each
# side. Tiny's route covers 6 of its 8 blocks (75%), as 2 -> 24 covers 23 of SiT-XL/2's
# 28: the share that makes SG(0.5, 0.9) cost less than one dense pass, the paper's claim.
MODEL_SIZES: dict[str, ModelSize] = {
    "Micro": ModelSize(depth=4, hidden_size=64, num_heads=2, route=(1, 2)),
    "Tiny": ModelSize(depth=8, hidden_size=128, num_heads=4, route=(1, 6)),
    "S": ModelSize(depth=12, hidden_size=384, num_heads=6, route=(2, 8)),
    "B": ModelSize(depth=12, hidden_size=768, num_heads=12, route=(2, 8)),
    "L": ModelSize(depth=24, hidden_size=1024, num_heads=16, route=(2, 20)),
    "XL": ModelSize(depth=28, hidden_size=1152, num_heads=16, route=(2, 24)),
}
PATCH_SIZES = (1, 2, 4, 8)
POS_EMBEDS = ("sincos", "stored")
PREDICTIONS = ("velocity", "epsilon")
_NAME = re.compile(r"^(?:DiT|SiT)-(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def parse_model_name(name: str) -> tuple[ModelSize, int]:
    """``"SiT-XL/2"`` -> (size, patch). ``DiT-`` and ``SiT-`` are synonyms."""
    match = _NAME.match(name) if isinstance(name, str) else None
    allowed = f"'SiT-<size>/<patch>' with size in {list(MODEL_SIZES)} and patch in {list(PATCH_SIZES)}"
    if match is None or match["size"] not in MODEL_SIZES or int(match["patch"]) not in PATCH_SIZES:
        raise fail("model", name, allowed)
    return MODEL_SIZES[match["size"]], int(match["patch"])


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes the network's shape and cost (and nothing else)."""

    input_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    routes: tuple[Route, ...] = field(default_factory=tuple)
    # Conventions of imported networks (``sgexp.models.upstream``); the defaults are sgexp's.
    time_scale: float = 1000.0  # the timestep embedding sees time_scale·t (DiT/SiT/TREAD: 1)
    time_reversed: bool = False  # embed 1 − t instead of t (SiT: t = 0 is noise)
    output_sign: int = 1  # −1 negates the output (SiT predicts x₀ − ε)
    pos_embed: str = "sincos"  # "sincos": recomputed; "stored": a table saved with the weights
    prediction: str = "velocity"  # "epsilon": a DDPM ε-network (DiT), t = t_ddpm/1000

    def __post_init__(self) -> None:
        for name in ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes"):
            check_positive_int(name, getattr(self, name))
        if self.input_size % self.patch_size:
            raise fail("input_size", self.input_size, f"must be divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise fail("hidden_size", self.hidden_size, f"must be divisible by num_heads={self.num_heads}")
        if self.hidden_size % 4:
            raise fail("hidden_size", self.hidden_size, "must be a multiple of 4 (2-D sin-cos embedding)")
        if not self.mlp_ratio > 0:
            raise fail("mlp_ratio", self.mlp_ratio, "must be > 0")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise fail("class_dropout_prob", self.class_dropout_prob, "must be in [0, 1)")
        object.__setattr__(self, "routes", check_routes(self.routes, self.depth))
        if isinstance(self.time_scale, bool) or not isinstance(self.time_scale, (int, float)) or self.time_scale <= 0:
            raise fail("time_scale", self.time_scale, "must be a number > 0")
        if not isinstance(self.time_reversed, bool):
            raise fail("time_reversed", self.time_reversed, "must be a bool")
        if self.output_sign not in (1, -1) or isinstance(self.output_sign, bool):
            raise fail("output_sign", self.output_sign, "must be 1 or -1")
        check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        check_choice("prediction", self.prediction, PREDICTIONS)

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        routes: Sequence[Route] | str = "default",
        train_sparsity: float = 0.5,
        **overrides,
    ) -> DiTConfig:
        """Config for a registry name. ``routes="default"`` is the size's TREAD
        route at ``train_sparsity``; ``routes=()`` gives a dense model."""
        size, patch = parse_model_name(name)
        if isinstance(routes, str):
            if routes != "default":
                raise fail("routes", routes, "must be 'default' or a sequence of Route")
            routes = (Route(*size.route, sparsity=check_sparsity("train_sparsity", train_sparsity)),)
        return cls(
            input_size=input_size,
            in_channels=in_channels,
            patch_size=patch,
            hidden_size=size.hidden_size,
            depth=size.depth,
            num_heads=size.num_heads,
            num_classes=num_classes,
            routes=tuple(routes),
            **overrides,
        )

    def to_dict(self) -> dict:
        """Plain types only (checkpoints, MLflow params); inverse of ``from_dict``."""
        return {**asdict(self), "routes": [asdict(r) for r in self.routes]}

    @classmethod
    def from_dict(cls, values: dict) -> DiTConfig:
        return cls(**{**values, "routes": tuple(Route(**r) for r in values.get("routes", ()))})

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def tokens_per_block(self, sparsity: float | Sequence[float] = 0.0) -> list[int]:
        """Tokens each block processes at the given γ (one value or one per route)."""
        gammas = resolve_sparsity(self.routes, sparsity, training=False)
        tokens = [self.num_tokens] * self.depth
        for r, gamma in zip(self.routes, gammas, strict=True):
            for block in range(r.start, r.end + 1):
                tokens[block] = kept_tokens(self.num_tokens, gamma)
        return tokens

    def first_routed_block(self, sparsity: float | Sequence[float] = 0.0) -> int:
        """Index of the first block that sees fewer than N tokens at γ (``depth`` if none)."""
        tokens = self.tokens_per_block(sparsity)
        return next((i for i, k in enumerate(tokens) if k < self.num_tokens), self.depth)

    def shared_prefix_blocks(self, sparsities: Sequence[float | Sequence[float]]) -> int:
        """Blocks ``[0, a)`` that passes at these γ (same x, t and label) compute identically.

        ``a`` is the earliest first routed block among them: before it every pass
        is dense.
        """
        return min(self.first_routed_block(s) for s in sparsities)


@dataclass
class Prefix:
    """State after ``DiT.forward_prefix``: tokens after blocks ``[0, num_blocks)`` and the conditioning."""

    tokens: torch.Tensor  # (B, N, D)
    c: torch.Tensor  # (B, D): timestep + label embedding, shared by every block
    num_blocks: int


class DiT(nn.Module):
    """Diffusion transformer over p×p patches with optional TREAD routes.

    ``forward(x, t, y, sparsity=None, generator=None)`` maps a noisy input
    x (B, C, H, W), times t ∈ [0, 1] (B,) and labels y (B,) (``null_label`` for
    the unconditional branch) to the velocity (B, C, H, W). Official DiT/SiT/TREAD
    weights load through ``sgexp.models.upstream`` into these conventions.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D, time_scale=config.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        # Fixed, not learned: a buffer so it follows .to(device). "stored" saves it with the
        # weights (the official checkpoints' layout: columns in the first half of the channels).
        stored = config.pos_embed == "stored"
        table = sincos_2d(D, config.input_size // config.patch_size, column_first=stored)
        self.register_buffer("pos_embed", table[None], persistent=stored)
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(D, config.patch_size, config.in_channels)
        self.compile_options: dict | None = None  # set by compile_core
        self.initialize_weights()

    @property
    def routes(self) -> tuple[Route, ...]:
        return self.config.routes

    @property
    def null_label(self) -> int:
        return self.y_embedder.null_label

    def initialize_weights(self) -> None:
        """DiT's initialisation, and why:

        * Linear layers: Xavier-uniform, zero bias: unit-variance activations at init.
        * Patch embedding: Xavier on the conv viewed as a linear map of the flattened patch.
        * Label table and timestep MLP: N(0, 0.02), the usual embedding scale.
        * adaLN modulation of every block, and the final layer: zero. All residual
          gates start at 0, so each block is the identity (adaLN-Zero) and the
          network starts by predicting 0; this is what made DiT train stably.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p·p·C) -> (B, C, H, W), inverting ``PatchEmbed``'s row-major token order."""
        p, C = self.config.patch_size, self.config.in_channels
        h = w = self.config.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], C, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor,
        sparsity: float | Sequence[float] | None = None,
        generator: Generators = None,
        keep: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Velocity prediction.

        ``sparsity``: γ for every route, or one per route; ``None`` means γ_train
        in training mode and dense in eval mode. ``generator``: one
        ``torch.Generator`` for the batch or one per image, for reproducible
        routing masks (and label dropout in training mode). ``keep``: the kept
        tokens themselves, one ``(B, K_r)`` index tensor per route, processed in
        that order (exact comparisons and analysis); it replaces ``sparsity``.

        The random draws (label dropout, then each route's kept tokens, in block
        order) run eagerly; the tensor computation is ``denoise``, a pure function
        of tensors with static shapes that ``compile_core`` hands to torch.compile.
        """
        y = self.y_embedder.drop(y, generator)
        keep = self.choose_tokens(x.shape[0], sparsity, generator, keep, x.device)
        return self.run(denoise, x, self.batch_times(t, x), y, keep)

    def forward_prefix(
        self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor, num_blocks: int, generator: Generators = None
    ) -> Prefix:
        """Embed (x, t, y) and run blocks ``[0, num_blocks)`` densely.

        Passes that agree on x, t and y compute the same prefix up to their first
        routed block (the conditioning enters every block through adaLN, so the
        label must agree too); Sparse Guidance runs it once for both branches and
        continues each with ``forward_suffix``. The ops are those of ``forward``,
        so the shared path is bit-identical to two separate passes.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 0 <= num_blocks <= self.config.depth:
            raise fail("num_blocks", num_blocks, f"must be an integer in [0, depth={self.config.depth}]")
        y = self.y_embedder.drop(y, generator)
        tokens, c = self.run(embed_prefix, x, self.batch_times(t, x), y, num_blocks)
        return Prefix(tokens, c, num_blocks)

    def forward_suffix(
        self,
        prefix: Prefix,
        sparsity: float | Sequence[float] | None = None,
        generator: Generators = None,
        keep: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Continue a ``forward_prefix`` state through the remaining blocks at sparsity γ
        (or with the given kept tokens, ``keep``, as in ``forward``).

        Every route active at this γ must start at or after the prefix's end: the
        prefix ran densely. ``prefix`` is not modified, so it can feed several
        suffixes (one per guidance branch).
        """
        x = prefix.tokens
        keep = self.choose_tokens(x.shape[0], sparsity, generator, keep, x.device, prefix.num_blocks)
        return self.run(run_suffix, x, prefix.c, prefix.num_blocks, keep)

    # ------------------------------------------------------------------ eager draws, pure compute

    @staticmethod
    def batch_times(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """t as a (B,) tensor: a number or a 0-d tensor is broadcast over the batch."""
        if torch.is_tensor(t) and t.ndim > 0:
            return t
        return torch.as_tensor(t, device=x.device).expand(x.shape[0])

    def choose_tokens(
        self,
        batch: int,
        sparsity: float | Sequence[float] | None = None,
        generator: Generators = None,
        keep: Sequence[torch.Tensor] | None = None,
        device: torch.device | None = None,
        first_block: int = 0,
    ) -> tuple[torch.Tensor | None, ...]:
        """The kept tokens of every route, drawn eagerly (``sgexp.models.routing.choose_tokens``)."""
        N, training = self.config.num_tokens, self.training
        return choose_tokens(self.routes, N, batch, sparsity, training, generator, keep, device, first_block)

    def compile_core(self, backend: str | None = "inductor", mode: str | None = None) -> DiT:
        """Run the tensor computation through ``torch.compile`` from now on (``backend=None``: eager
        again). The random draws stay eager, so a step stays reproducible; the weights and the
        state dict are unchanged, and copies (the EMA) inherit the setting."""
        self.compile_options = None if backend is None else {"backend": backend, "mode": mode}
        return self

    def run(self, fn, *args):
        """``fn(self, *args)``, through its compiled version when ``compile_core`` asked for one."""
        return (compiled(fn, **self.compile_options) if self.compile_options else fn)(self, *args)

    def shared_prefix_blocks(self, sparsities: Sequence[float | Sequence[float]]) -> int:
        """Blocks that passes at these γ can share (see ``DiTConfig.shared_prefix_blocks``)."""
        return self.config.shared_prefix_blocks(sparsities)


def embed_prefix(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, num_blocks: int):
    """Tokens after blocks ``[0, num_blocks)`` and the conditioning c (labels already dropped)."""
    if model.config.time_reversed:
        t = 1 - t
    tokens = model.x_embedder(x) + model.pos_embed  # (B, N, D)
    c = model.t_embedder(t) + model.y_embedder.table(y)  # (B, D)
    for i in range(num_blocks):
        tokens = model.blocks[i](tokens, c)
    return tokens, c


def run_suffix(model: DiT, x: torch.Tensor, c: torch.Tensor, num_blocks: int, keep) -> torch.Tensor:
    """Blocks ``[num_blocks, depth)`` and the output layer; a route runs on its ``keep`` indices
    (``None``: dense). Shapes depend only on the index tensors' shapes: one graph per kept count."""
    starts = {r.start: (r, idx) for r, idx in zip(model.routes, keep, strict=True) if idx is not None}
    full = idx = end = None
    for i in range(num_blocks, model.config.depth):
        if i in starts:
            r, idx = starts[i]
            full, x, end = x, route(x, idx), r.end  # (B, K, D)
        x = model.blocks[i](x, c)
        if full is not None and i == end:
            x, full = unroute(full, x, idx), None  # (B, N, D)
    x = model.unpatchify(model.final_layer(x, c))  # (B, N, p·p·C) -> (B, C, H, W)
    return -x if model.config.output_sign < 0 else x


def denoise(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, keep) -> torch.Tensor:
    """The whole network on given draws: x (B, C, H, W), t (B,), dropped labels (B,), kept tokens per route."""
    tokens, c = embed_prefix(model, x, t, y, 0)
    return run_suffix(model, tokens, c, 0, keep)


def build_model(name: str, **kwargs) -> DiT:
    """``build_model("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)``;
    keyword arguments as in ``DiTConfig.from_name``."""
    return DiT(DiTConfig.from_name(name, **kwargs))
