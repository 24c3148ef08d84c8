"""One guided evaluation as a single compiled call (``DiT.compile_core``; ``sgexp.models.compiled``).

``sgexp.diffusion.guidance.evaluate`` draws every pass's kept tokens eagerly (in the order of the
eager path, so the masks are the same bit for bit) and hands them, with each pass's labels, to
``guided_passes``: a pure function of tensors that dynamo traces as one graph with no breaks. The
rule decides what can be merged: passes of one label and one model share their dense prefix (SG);
passes that keep the same token counts in every route (CFG, ICG: all dense) run as one batch of P·B
images; others (CFG+SG) run pass after pass inside the same graph.
"""

from __future__ import annotations

import torch

from sgexp.models.dit import denoise, embed_prefix, run_suffix


def combine(weights, outputs: list[torch.Tensor]) -> torch.Tensor:
    """D_0 + Σ_{i≥1} a_i·(D_i − D_0); ``weights`` = (a_1, ...), numbers or a tensor."""
    guided = outputs[0]
    for weight, output in zip(weights, outputs[1:], strict=False):
        guided = guided + weight * (output - outputs[0])
    return guided


def guided_passes(model, x, t, labels, keeps, num_prefix: int, weights: torch.Tensor) -> torch.Tensor:
    """One guided evaluation of a DiT on given draws, traced as one graph.

    With a shared prefix (SG) the blocks before the first routed block run once and each
    pass continues from them; passes whose routes keep the same token counts (CFG, ICG: all
    dense) run as one batch of P·B images; otherwise (CFG+SG) pass after pass.
    """
    if num_prefix:
        tokens, c = embed_prefix(model, x, t, labels[0], num_prefix)
        outputs = [run_suffix(model, tokens, c, num_prefix, keep) for keep in keeps]
    elif all(_same_shapes(per_route) for per_route in zip(*keeps, strict=True)):
        P = len(keeps)
        keep = tuple(None if k[0] is None else torch.cat(k) for k in zip(*keeps, strict=True))
        batched = denoise(model, torch.cat([x] * P), torch.cat([t] * P), torch.cat(labels), keep)
        outputs = list(batched.chunk(P))
    else:
        outputs = [denoise(model, x, t, y, keep) for y, keep in zip(labels, keeps, strict=True)]
    return combine(weights, outputs)


def _same_shapes(indices: tuple) -> bool:
    """One route's kept-token tensors of all passes: all dense, or all keeping the same count."""
    if all(k is None for k in indices):
        return True
    return all(k is not None and k.shape == indices[0].shape for k in indices)
