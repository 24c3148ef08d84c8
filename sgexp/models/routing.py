"""TREAD token routing: select, route, unroute.

TREAD (arXiv 2501.04765) trains a transformer on all tokens but lets a random
fraction γ of them *skip* a contiguous span of blocks: before the span the
kept tokens are gathered, the span runs on them alone, and after the span they
are scattered back among the skipped tokens, which re-enter unchanged (the
positional embedding was added before block 0 and travels with every token).
There are no learned parameters and no mask token, so the same weights run at
any γ at inference; Sparse Guidance exploits exactly that.

Conventions (see DESIGN.md):
  * a route spans blocks ``start..end`` *inclusive* (0-based);
  * γ is the fraction of tokens that skip; an image keeps exactly
    ``N - floor(N·γ)`` tokens, chosen uniformly at random, independently per image;
  * γ = 0 (or any γ that keeps every token) runs the dense path untouched, so it
    is bit-identical to a model without routes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sgexp.checks import check_sparsity, fail

# A generator for the whole batch, or one per image. Per-image generators make a
# sample's routing masks independent of which batch it was drawn in.
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class Route:
    """Blocks ``start..end`` (inclusive) see only a subset of the tokens.

    ``sparsity`` is γ_train, the fraction of tokens that skip the span during
    training (TREAD's default 0.5); inference picks its own γ per forward pass.
    """

    start: int
    end: int
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise fail("route.start", self.start, "must be an integer block index >= 0")
        if isinstance(self.end, bool) or not isinstance(self.end, int) or self.end < self.start:
            raise fail("route.end", self.end, f"must be an integer block index >= route.start={self.start}")
        check_sparsity("route.sparsity", self.sparsity)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start + 1

    @classmethod
    def parse(cls, spec: str) -> Route:
        """``"2:24"`` or ``"2:24@0.5"`` (start:end inclusive, optional γ_train)."""
        span, _, gamma = spec.partition("@")
        try:
            start, end = (int(v) for v in span.split(":"))
            train_gamma = float(gamma) if gamma else 0.5
        except ValueError:
            raise fail("route", spec, "expected 'start:end' or 'start:end@gamma', e.g. '2:24@0.5'") from None
        return cls(start, end, train_gamma)


def check_routes(routes: Sequence[Route], depth: int) -> tuple[Route, ...]:
    """Routes sorted by start; each inside ``0..depth-1``; spans may not overlap."""
    routes = tuple(sorted(routes, key=lambda r: r.start))
    for route in routes:
        if not isinstance(route, Route):
            raise fail("routes", route, "each route must be a sgexp.models.routing.Route")
        if route.end >= depth:
            raise fail(
                "routes", f"{route.start}:{route.end}", f"route blocks must lie in 0..{depth - 1} (depth={depth})"
            )
    for prev, nxt in zip(routes, routes[1:], strict=False):
        if nxt.start <= prev.end:
            raise fail(
                "routes",
                [f"{r.start}:{r.end}" for r in routes],
                f"spans may not overlap ({prev.start}:{prev.end} and {nxt.start}:{nxt.end})",
            )
    return routes


def kept_tokens(num_tokens: int, sparsity: float) -> int:
    """Tokens an image keeps inside a route: ``N - floor(N·γ)``.

    The small epsilon guards against products like 100·0.29 = 28.999999999999996
    rounding down below the exact value.
    """
    return num_tokens - math.floor(num_tokens * sparsity + 1e-9)


def resolve_sparsity(
    routes: Sequence[Route], sparsity: float | Sequence[float] | None, training: bool
) -> tuple[float, ...]:
    """One γ per route. ``None`` means γ_train while training and dense (0) otherwise."""
    if sparsity is None:
        return tuple(r.sparsity if training else 0.0 for r in routes)
    if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool):
        return tuple(check_sparsity("sparsity", sparsity) for _ in routes)
    values = tuple(sparsity)
    if len(values) != len(routes):
        raise fail("sparsity", sparsity, f"must be one number or one per route ({len(routes)} routes)")
    return tuple(check_sparsity(f"sparsity[{i}]", v) for i, v in enumerate(values))


def select_tokens(
    batch: int, num_tokens: int, keep: int, generator: Generators = None, device: torch.device | None = None
) -> torch.Tensor:
    """Indices of the kept tokens, ``(batch, keep)``, sorted within each image.

    Each image draws ``num_tokens`` uniform scores and keeps the ``keep``
    smallest: a uniformly random subset of exact size. With a list of generators
    image ``b`` draws its scores from ``generator[b]`` alone (on the CPU, so the
    masks do not depend on the device either).
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        scores = torch.rand(batch, num_tokens, generator=generator, device=gen_device)
    else:
        if len(generator) != batch:
            raise fail("generator", f"<{len(generator)} generators>", f"need one generator per image ({batch})")
        scores = torch.stack([torch.rand(num_tokens, generator=g, device=g.device) for g in generator])
    idx = scores.argsort(dim=1)[:, :keep].sort(dim=1).values
    if device is None or idx.device == torch.device(device):
        return idx
    if idx.device.type == "cpu" and torch.device(device).type == "cuda":
        # A pageable host->device copy waits for the GPU to drain; a pinned one is
        # queued like a kernel, so the host keeps launching the blocks ahead of the GPU.
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def choose_tokens(
    routes: Sequence[Route],
    num_tokens: int,
    batch: int,
    sparsity: float | Sequence[float] | None,
    training: bool,
    generator: Generators = None,
    keep: Sequence[torch.Tensor] | None = None,
    device: torch.device | None = None,
    first_block: int = 0,
) -> tuple[torch.Tensor | None, ...]:
    """The kept tokens of every route of one pass, drawn (or checked, if ``keep`` is given)
    before the network runs: a ``(B, K_r)`` index tensor per route, ``None`` for a route
    that keeps every token (the dense path, untouched). Draws run in block order, the
    order the eager forward pass always used, so the masks do not depend on whether the
    network is compiled. ``first_block``: a prefix ran the blocks before it densely."""
    if keep is not None:
        keep = check_keep(keep, routes, batch, num_tokens, device)
        counts = [idx.shape[1] for idx in keep]
    else:
        counts = [kept_tokens(num_tokens, g) for g in resolve_sparsity(routes, sparsity, training)]
    # Routes that drop at least one token (or are given indices); γ=0 leaves the dense path untouched.
    active = [keep is not None or k < num_tokens for k in counts]
    early = [r.start for r, a in zip(routes, active, strict=True) if a and r.start < first_block]
    if early:
        raise fail(
            "prefix.num_blocks",
            first_block,
            f"the prefix ran block {min(early)} densely but sparsity={sparsity} routes it",
        )
    if keep is not None:
        return keep
    return tuple(
        select_tokens(batch, num_tokens, k, generator, device=device) if a else None
        for k, a in zip(counts, active, strict=True)
    )


def check_keep(
    keep: Sequence[torch.Tensor], routes: Sequence[Route], batch: int, num_tokens: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Given kept-token indices: one ``(batch, K_r)`` integer tensor per route, distinct
    indices in ``[0, num_tokens)``, any order (the span processes them in that order)."""
    keep = tuple(keep)
    if len(keep) != len(routes):
        raise fail("keep", f"<{len(keep)} tensors>", f"need one (B, K) index tensor per route ({len(routes)})")
    for r, idx in enumerate(keep):
        shape = tuple(idx.shape) if torch.is_tensor(idx) else None
        if shape is None or idx.dtype != torch.long or len(shape) != 2 or shape[0] != batch:
            raise fail(f"keep[{r}]", shape or idx, f"must be a ({batch}, K) int64 tensor of token indices")
        if not 1 <= shape[1] <= num_tokens or idx.min() < 0 or idx.max() >= num_tokens:
            raise fail(f"keep[{r}]", shape, f"needs 1 <= K <= {num_tokens} indices in [0, {num_tokens})")
        if (idx.sort(dim=1).values.diff(dim=1) == 0).any():
            raise fail(f"keep[{r}]", shape, "indices must be distinct within each image")
    return tuple(idx.to(device) for idx in keep)


def _rows(idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K) token indices -> (B·K,) row indices into the tokens flattened to (B·N, D)."""
    offsets = torch.arange(idx.shape[0], device=idx.device).mul_(num_tokens).unsqueeze(1)  # (B, 1)
    return (idx + offsets).reshape(-1)


# Both directions copy whole D-wide rows (index_select / index_copy) instead of
# gathering element by element with an index expanded to (B, K, D): the same
# values, bit for bit, with one index per token instead of one per element
# (7x faster gather, 2.7x faster scatter on 2 CPU cores; see benchmarks/router.py).


def route(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather the kept tokens: ``(B, N, D), (B, K) -> (B, K, D)``."""
    B, N, D = x.shape
    return x.reshape(B * N, D).index_select(0, _rows(idx, N)).view(B, idx.shape[1], D)


def unroute(x_full: torch.Tensor, x_kept: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Scatter the processed kept tokens back among the skipped ones.

    ``x_full`` (B, N, D) holds every token as it was before the span; the
    skipped tokens come back from it unchanged.
    """
    B, N, D = x_full.shape
    return x_full.reshape(B * N, D).index_copy(0, _rows(idx, N), x_kept.reshape(-1, D)).view(B, N, D)
