"""Prefix sharing: SG's two branches run their common dense prefix once.

Bit-identical results to the unshared path, priced by the FLOPs model
(SiT-XL/2 route 2→24, SG(0.5, 0.9): 97.65 -> 89.47 GFLOPs per step), and
cross-checked with FlopCounterMode on a small model.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import randomize, small_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sgexp.diffusion import Sampler, autoguidance, cfg, cfg_sparse_guidance, sparse_guidance, unguided
from sgexp.diffusion.guidance import evaluate
from sgexp.eval.sampling import Setting, cost_summary
from sgexp.flops import main, prefix_macs, sample_cost, step_macs
from sgexp.models import DiT, DiTConfig, Route

XL = DiTConfig.from_name("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, routes=(Route(2, 24),))
EULER40 = Sampler("euler", 40)


def gens(seed=0, n=4):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture
def model():
    # Route 2..4 of 6 blocks: a two-block prefix to share.
    return randomize(DiT(small_config(routes=(Route(2, 4),))), seed=3).eval()


@pytest.fixture
def xy():
    gen = torch.Generator().manual_seed(5)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 3])


def test_xl2_sg_step_costs_89_5_gflops_with_sharing():
    rule = sparse_guidance(1.5, 0.5, 0.9)
    shared = sample_cost(XL, rule, EULER40)
    unshared = sample_cost(XL, rule, EULER40, share_prefix=False)
    assert shared.share_prefix and not unshared.share_prefix
    assert unshared.gflops_per_step == pytest.approx(97.65, abs=0.01)
    assert shared.gflops_per_step == pytest.approx(89.47, abs=0.01)
    assert shared.gflops_per_step + shared.gflops_shared_per_step == pytest.approx(unshared.gflops_per_step)
    # The rule's own switch gives the same price as the override.
    off = sample_cost(XL, replace(rule, share_prefix=False), EULER40)
    assert off.gflops_per_step == unshared.gflops_per_step and off.gflops_shared_per_step == 0
    # Shared: patch embedding, timestep MLP and blocks 0-1 at 256 tokens, once.
    assert shared.gflops_shared_per_step == pytest.approx(prefix_macs(XL, 2) / 1e9)


@pytest.mark.parametrize(
    "rule",
    [unguided(), cfg(1.5), cfg_sparse_guidance(1.5, 0.0, 0.5), autoguidance(1.5, 0.25, 0.5)],
    ids=["none", "cfg", "cfg_sg", "ag_sg"],
)
def test_rules_whose_branches_differ_share_nothing(rule):
    # Different label (CFG, CFG+SG) or model (AG): the prefix differs, nothing is priced as shared.
    cost = sample_cost(XL, rule, EULER40)
    assert cost.gflops_shared_per_step == 0
    assert cost.gflops_per_step == sample_cost(XL, rule, EULER40, share_prefix=False).gflops_per_step
    assert not rule.shares_prefix(rule.passes(0, 40, 0.5))


def test_cli_prices_sharing_by_default(capsys):
    args = ["--model", "SiT-XL/2", "--route", "2:24", "--guidance", "sg", "--scale", "1.5"]
    args += ["--gamma-strong", "0.5", "--gamma-weak", "0.9", "--json"]
    assert main(args) == 0
    shared = json.loads(capsys.readouterr().out)
    assert main([*args, "--no-share-prefix"]) == 0
    unshared = json.loads(capsys.readouterr().out)
    assert shared["gflops_per_step"] == pytest.approx(89.47, abs=0.01) and shared["guidance"]["share_prefix"]
    assert unshared["gflops_per_step"] == pytest.approx(97.65, abs=0.01) and not unshared["guidance"]["share_prefix"]


def test_prefix_then_suffix_is_forward(model, xy):
    x, y = xy
    t = torch.rand(4, generator=torch.Generator().manual_seed(0))
    for gamma in (0.0, 0.5, 0.75):
        reference = model(x, t, y, sparsity=gamma, generator=gens())
        for num_blocks in range(0, 3 if gamma > 0 else 7):
            prefix = model.forward_prefix(x, t, y, num_blocks)
            assert torch.equal(model.forward_suffix(prefix, gamma, generator=gens()), reference)
    assert model.shared_prefix_blocks([0.5, 0.9]) == 2 and model.shared_prefix_blocks([0.0, 0.0]) == 6
    with pytest.raises(ValueError, match="prefix.num_blocks=3 is invalid"):
        model.forward_suffix(model.forward_prefix(x, t, y, 3), 0.5)
    with pytest.raises(ValueError, match="num_blocks=7 is invalid"):
        model.forward_prefix(x, t, y, 7)


def test_prefix_depends_on_the_label(model, xy):
    # Why CFG and CFG+SG cannot share: adaLN feeds the label into every block.
    x, y = xy
    t = torch.full((4,), 0.5)
    cond = model.forward_prefix(x, t, y, 2).tokens
    null = model.forward_prefix(x, t, torch.full_like(y, model.null_label), 2).tokens
    assert not torch.allclose(cond, null, atol=1e-3)


@pytest.mark.parametrize(
    "rule",
    [
        sparse_guidance(3.0, 0.25, 0.75),
        sparse_guidance(3.0, 0.5, 0.9, interval=(0.3, 0.8)),
        sparse_guidance(3.0, "cosine:0:0.5", "cosine:0.75:0.25"),  # strong branch dense at step 0
        cfg_sparse_guidance(3.0, 0.0, 0.5),
        cfg(3.0),
    ],
    ids=["sg", "sg_interval", "sg_cosine", "cfg_sg", "cfg"],
)
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_shared_sampling_is_bit_identical(model, xy, rule, solver):
    x, y = xy
    sampler = Sampler(solver, 4)
    shared = sampler.sample(rule, {"main": model}, x, y, generator=gens())
    unshared = sampler.sample(replace(rule, share_prefix=False), {"main": model}, x, y, generator=gens())
    assert torch.equal(shared, unshared)
    shares = any(rule.shares_prefix(rule.passes(s, 4, t)) for s, t in sampler.evaluation_points())
    assert shares == (rule.name == "sg")


def _counted_step_macs(model, rule, x, y) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        evaluate(rule, {"main": model}, x, 0.5, y, 0, 10, generator=gens())
    return counter.get_total_flops() / 2 / x.shape[0]  # 2 FLOPs per multiply-accumulate


@pytest.mark.parametrize("share", [True, False])
def test_flop_counter_sees_the_shared_prefix_once(model, xy, share):
    x, y = xy
    rule = sparse_guidance(3.0, 0.25, 0.75, share_prefix=share)
    analytic = step_macs({"main": model.config}, rule.passes(0, 10, 0.5), share, include_attention=True)
    assert analytic == pytest.approx(_counted_step_macs(model, rule, x, y), rel=0.01)


def test_sampling_report_prices_sharing():
    config = small_config(routes=(Route(2, 4),))
    sampler = Sampler("euler", 10)
    rows = {
        share: cost_summary(
            Setting("sg", sparse_guidance(3.0, 0.5, 0.9, share_prefix=share)), {"main": config}, sampler, 1.0, 10
        )
        for share in (True, False)
    }
    saved = prefix_macs(config, 2) / 1e9
    assert rows[False]["gflops_per_step"] - rows[True]["gflops_per_step"] == pytest.approx(saved)
