"""TREAD router: exact counts, untouched tokens, gradients, γ=0 == dense, reproducible masks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize, small_config

from sgexp.models import DiT, Route, kept_tokens, select_tokens
from sgexp.models.routing import check_routes, route, unroute


@pytest.mark.parametrize("n,gamma", [(16, 0.5), (256, 0.9), (49, 0.5), (100, 0.29), (256, 0.0), (7, 0.99)])
def test_kept_count_is_exact(n, gamma):
    keep = kept_tokens(n, gamma)
    assert keep == n - math.floor(round(n * gamma, 9))
    idx = select_tokens(3, n, keep, torch.Generator().manual_seed(0))
    assert idx.shape == (3, keep)
    for row in idx:
        assert len(set(row.tolist())) == keep  # no duplicates
        assert torch.equal(row, row.sort().values)
        assert 0 <= row.min() and row.max() < n


def test_selection_is_uniform_and_independent_per_image():
    n, keep, draws = 10, 4, 4000
    idx = select_tokens(draws, n, keep, torch.Generator().manual_seed(0))
    freq = torch.bincount(idx.flatten(), minlength=n).float() / draws
    assert torch.allclose(freq, torch.full((n,), keep / n), atol=0.03)
    # Images draw different subsets (independent), not one shared mask.
    assert len({tuple(r.tolist()) for r in idx[:50]}) > 40


def test_route_then_unroute_restores_skipped_tokens():
    x = torch.randn(2, 6, 3)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    kept = route(x, idx)
    assert torch.equal(kept[1], x[1, [1, 3, 4]])
    out = unroute(x, kept + 1.0, idx)
    assert torch.equal(out[0, [1, 3, 4]], x[0, [1, 3, 4]])  # skipped: unchanged
    assert torch.equal(out[0, [0, 2, 5]], x[0, [0, 2, 5]] + 1.0)  # kept: processed


def _block_inputs(model: DiT, *args, **kwargs) -> dict[str, torch.Tensor]:
    """Run a forward; record the tokens entering (key i) and leaving (key "out i") each block,
    and entering the final layer."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0])) for i, b in enumerate(model.blocks)
    ]
    hooks += [
        b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"out {i}", o))
        for i, b in enumerate(model.blocks)
    ]
    hooks.append(model.final_layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0])))
    model(*args, **kwargs)
    for h in hooks:
        h.remove()
    return seen


def test_blocks_outside_the_span_see_all_tokens(model, batch):
    seen = _block_inputs(model, *batch, sparsity=0.5, generator=torch.Generator().manual_seed(0))
    assert [seen[i].shape[1] for i in range(6)] == [16, 8, 8, 8, 16, 16]
    assert model.config.tokens_per_block(0.5) == [16, 8, 8, 8, 16, 16]


def test_skipped_tokens_come_back_unchanged(model, batch):
    seed = 3
    seen = _block_inputs(model, *batch, sparsity=0.75, generator=torch.Generator().manual_seed(seed))
    idx = select_tokens(4, 16, kept_tokens(16, 0.75), torch.Generator().manual_seed(seed))
    before, after = seen["out 0"], seen[4]  # before the span (1..3) is routed, after it is unrouted
    for b in range(4):
        skipped = sorted(set(range(16)) - set(idx[b].tolist()))
        kept = idx[b].tolist()
        assert len(skipped) == 12
        assert torch.equal(after[b, skipped], before[b, skipped])
        assert not torch.isclose(after[b, kept], before[b, kept]).all(dim=-1).any()


def test_route_ending_at_last_block_is_unrouted_before_final_layer(batch):
    model = randomize(DiT(small_config(routes=(Route(2, 5),)))).eval()
    seen = _block_inputs(model, *batch, sparsity=0.5, generator=torch.Generator().manual_seed(0))
    assert seen["final"].shape == (4, 16, 32)
    assert seen[5].shape == (4, 8, 32)


def test_gamma_zero_is_bit_identical_to_dense(batch):
    routed = randomize(DiT(small_config())).eval()
    dense = DiT(small_config(routes=()))
    dense.load_state_dict(routed.state_dict())
    dense.eval()
    reference = dense(*batch)
    assert torch.equal(routed(*batch), reference)  # eval default: dense
    assert torch.equal(routed(*batch, sparsity=0.0), reference)
    assert torch.equal(routed(*batch, sparsity=0.01), reference)  # floor(16·0.01)=0: nothing skipped
    routed.train()
    routed.y_embedder.dropout_prob = 0.0
    assert torch.equal(routed(*batch, sparsity=0.0), reference)  # training mode, routing off
    assert not torch.equal(routed(*batch), reference)  # training mode default: γ_train = 0.5


def test_gradients_reach_all_parameters(batch):
    model = randomize(DiT(small_config())).train()
    x, t, y = batch
    out = model(x, t, y, generator=torch.Generator().manual_seed(0))  # routed, γ_train
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_masks_are_reproducible_with_a_generator(model, batch):
    a = model(*batch, sparsity=0.5, generator=torch.Generator().manual_seed(7))
    b = model(*batch, sparsity=0.5, generator=torch.Generator().manual_seed(7))
    c = model(*batch, sparsity=0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_per_image_generators_make_an_image_independent_of_its_batch(model, batch):
    x, t, y = batch
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = model(x, t, y, sparsity=0.5, generator=gens([10, 11, 12, 13]))
    part = model(x[2:], t[2:], y[2:], sparsity=0.5, generator=gens([12, 13]))
    torch.testing.assert_close(part, full[2:], rtol=0, atol=1e-5)


def test_several_routes_with_one_sparsity_each(batch):
    model = randomize(DiT(small_config(routes=(Route(0, 1), Route(3, 4))))).eval()
    seen = _block_inputs(model, *batch, sparsity=(0.5, 0.75), generator=torch.Generator().manual_seed(0))
    assert [seen[i].shape[1] for i in range(6)] == [8, 8, 16, 4, 4, 16]
    assert model.config.tokens_per_block((0.5, 0.75)) == [8, 8, 16, 4, 4, 16]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(routes=(Route(1, 3), Route(3, 4))), "may not overlap"),
        (dict(routes=(Route(2, 6),)), r"must lie in 0\.\.5"),
    ],
)
def test_bad_routes_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_config(**kwargs)


@pytest.mark.parametrize("gamma", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity_names_parameter(model, batch, gamma):
    with pytest.raises(ValueError, match=r"sparsity=.* is invalid: sparsity must be in \[0, 1\)"):
        model(*batch, sparsity=gamma)
    with pytest.raises(ValueError, match="route.sparsity"):
        Route(1, 2, gamma)


def test_bad_route_specs():
    with pytest.raises(ValueError, match="route.end"):
        Route(3, 2)
    with pytest.raises(ValueError, match="expected 'start:end'"):
        Route.parse("2-24")
    assert Route.parse("2:24@0.25") == Route(2, 24, 0.25)
    assert check_routes((Route(4, 5), Route(0, 1)), 6) == (Route(0, 1), Route(4, 5))  # sorted


def test_one_sparsity_per_route_is_checked(model, batch):
    with pytest.raises(ValueError, match=r"sparsity=\(0.1, 0.2\) is invalid: must be one number or one per route"):
        model(*batch, sparsity=(0.1, 0.2))
