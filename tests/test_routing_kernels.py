"""route/unroute copy whole token rows; they must equal the element-wise gather/scatter bit for bit."""

from __future__ import annotations

import torch

from sgexp.models.routing import route, select_tokens, unroute


def reference_route(x, idx):
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def reference_unroute(x_full, x_kept, idx):
    return torch.scatter(x_full, 1, idx.unsqueeze(-1).expand(-1, -1, x_full.shape[-1]), x_kept)


def test_row_copies_equal_gather_and_scatter_with_gradients():
    gen = torch.Generator().manual_seed(0)
    B, N, D, K = 5, 16, 12, 7
    idx = select_tokens(B, N, K, gen)
    results = []
    for r, u in ((route, unroute), (reference_route, reference_unroute)):
        x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
        w = torch.randn(D, D, generator=torch.Generator().manual_seed(2), requires_grad=True)
        kept = r(x, idx)
        out = u(x, torch.tanh(kept @ w), idx)  # stands in for the routed blocks
        grad = torch.randn(B, N, D, generator=torch.Generator().manual_seed(3))
        gx, gw = torch.autograd.grad(out, (x, w), grad)
        results.append((kept, out, gx, gw))
    for mine, ref in zip(*results, strict=True):
        assert torch.equal(mine, ref)


def test_non_contiguous_input():
    x = torch.randn(4, 10, 6).transpose(0, 1).contiguous().transpose(0, 1)  # (4, 10, 6), non-contiguous
    idx = select_tokens(4, 10, 3, torch.Generator().manual_seed(0))
    assert torch.equal(route(x, idx), reference_route(x, idx))
    kept = torch.randn(4, 3, 6)
    assert torch.equal(unroute(x, kept, idx), reference_unroute(x, kept, idx))
