"""Analytic FLOPs: the paper's SiT-XL/2 table and a cross-check against FlopCounterMode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import small_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sgexp.diffusion import (
    Branch,
    Constant,
    Guidance,
    Sampler,
    autoguidance,
    cfg,
    cfg_sparse_guidance,
    icg,
    sparse_guidance,
    unguided,
)
from sgexp.flops import main, pass_macs, prefix_macs, sample_cost
from sgexp.models import DiT, DiTConfig, Route

XL = DiTConfig.from_name("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000, routes=(Route(2, 24),))
EULER40 = Sampler("euler", 40)


@pytest.mark.parametrize(
    "rule,paper",
    [
        (unguided(), 114.42),
        (cfg(1.5), 228.84),
        (icg(1.5), 228.84),  # the paper's ICG row (FID 2.81)
        (sparse_guidance(1.5, 0.5, 0.9), 97.67),
        # SG_FID: weak = another checkpoint at cosine 0.6->0, strong cosine 0->0.6.
        (autoguidance(1.5, "cosine:0:0.6", "cosine:0.6:0"), 173.16),
    ],
    ids=["unguided", "cfg", "icg", "sg_0.5_0.9", "ag_sg_cosine"],
)
def test_paper_gflops_per_step(rule, paper):
    cost = sample_cost(XL, rule, EULER40, share_prefix=False)  # the paper runs every pass in full
    assert cost.gflops_per_step == pytest.approx(paper, rel=0.005)
    assert cost.gflops_per_sample == pytest.approx(40 * cost.gflops_per_step)


def test_icg_is_priced_as_two_dense_passes_without_sharing(capsys):
    config = small_config()
    sampler = Sampler("heun", 5)
    cost = sample_cost(config, icg(2.0, interval=(0.3, 0.7)), sampler)  # as the sampler runs it (share_prefix on)
    assert cost == sample_cost(config, cfg(2.0, interval=(0.3, 0.7)), sampler) and cost.gflops_shared_per_step == 0
    guided = sum(0.3 <= t <= 0.7 for _, t in sampler.evaluation_points())
    evaluations = len(sampler.evaluation_points())
    assert cost.gflops_per_sample == pytest.approx((evaluations + guided) * pass_macs(config, 0.0) / 1e9)
    assert main(["--guidance", "icg", "--scale", "1.5", "--json"]) == 0  # SiT-XL/2, route 2:24, prefix sharing on
    result = json.loads(capsys.readouterr().out)
    assert result["gflops_per_step"] == pytest.approx(228.84, rel=0.005) and result["relative_to_cfg"] == 1.0


def test_sg_costs_43_percent_of_cfg():
    ratio = (
        sample_cost(XL, sparse_guidance(1.5, 0.5, 0.9), EULER40, share_prefix=False).gflops_per_sample
        / sample_cost(XL, cfg(1.5), EULER40).gflops_per_sample
    )
    assert ratio == pytest.approx(0.427, abs=0.002)


def _counted_macs(model: DiT, sparsity: float, include_attention: bool, batch: int = 3) -> float:
    x = torch.randn(batch, 3, 8, 8)
    t = torch.rand(batch)
    y = torch.arange(batch) % 5
    # MATH backend: fused CPU attention kernels are counted as zero FLOPs.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, sparsity=sparsity, generator=torch.Generator().manual_seed(0))
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if "bmm" in str(op) or "attention" in str(op))
    assert attention > 0  # the attention products were really seen
    total = counter.get_total_flops() - (0 if include_attention else attention)
    return total / 2 / batch  # FlopCounterMode counts 2 FLOPs per multiply-accumulate


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("include_attention", [False, True])
def test_analytic_count_matches_flop_counter(sparsity, include_attention):
    model = DiT(small_config()).eval()
    counted = _counted_macs(model, sparsity, include_attention)
    analytic = pass_macs(model.config, sparsity, include_attention)
    assert analytic == pytest.approx(counted, rel=0.01)


def test_counter_check_on_two_routes_and_wider_mlp():
    config = small_config(routes=(Route(0, 1), Route(3, 5)), mlp_ratio=2.0, hidden_size=48)
    model = DiT(config).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, sparsity=(0.25, 0.5), generator=torch.Generator().manual_seed(0))
    assert pass_macs(config, (0.25, 0.5), True) == pytest.approx(counter.get_total_flops() / 4, rel=0.01)


def test_rule_pricing_follows_passes():
    config = small_config()
    dense = pass_macs(config, 0.0)
    sampler = Sampler("heun", 10)
    assert sample_cost(config, cfg(2.0), sampler).gflops_per_sample == pytest.approx(2 * 20 * dense / 1e9)
    # Guidance interval: unguided (1 pass) outside t in [0.3, 0.7].
    interval = sample_cost(config, cfg(2.0, interval=(0.3, 0.7)), Sampler("euler", 10))
    guided_steps = sum(0.3 <= 1 - i / 10 <= 0.7 for i in range(10))
    assert interval.passes_per_step == pytest.approx((10 + guided_steps) / 10)
    mixed = sample_cost(config, cfg_sparse_guidance(2.0, 0.0, 0.5), Sampler("euler", 4))
    assert mixed.gflops_per_step == pytest.approx((dense + pass_macs(config, 0.5)) / 1e9)
    assert sample_cost(config, cfg(1.0), sampler).passes_per_step == 2  # w=1: one pass per evaluation


def test_cli_json():
    args = "--model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance sg --scale 1.5"
    args += " --gamma-strong 0.5 --gamma-weak 0.9 --steps 40 --json --no-share-prefix"
    out = subprocess.run(
        [sys.executable, "-m", "sgexp.flops", *args.split()], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    assert result["input_size"] == 32 and result["tokens"] == 256
    assert result["gflops_per_pass_dense"] == pytest.approx(114.42, rel=0.005)
    assert result["gflops_per_step"] == pytest.approx(97.67, rel=0.005)
    assert result["gflops_per_sample"] == pytest.approx(40 * 97.67, rel=0.005)
    assert result["passes_per_step"] == 2


def test_cli_attention_and_errors(capsys):
    assert main(["--model", "SiT-XL/2", "--route", "none", "--include-attention", "--json"]) == 0
    # DiT-XL/2's 118.6 GFLOPs (DiT paper, attention included).
    assert json.loads(capsys.readouterr().out)["gflops_per_pass_dense"] == pytest.approx(118.6, rel=0.005)
    assert main(["--guidance", "sg", "--gamma-strong", "0.9", "--gamma-weak", "0.5", "--scale", "2"]) == 2
    assert "gamma_strong=0.9 is invalid" in capsys.readouterr().err
    assert main(["--model", "SiT-XXL/2"]) == 2
    assert "model='SiT-XXL/2' is invalid" in capsys.readouterr().err
    assert main(["--route", "2:40"]) == 2
    assert "route blocks must lie in 0..27" in capsys.readouterr().err


def test_a_rule_built_from_data_is_priced_from_the_same_description():
    """A three-branch rule written as data (CFG on top of SG) costs its three passes; three
    conditional sparsities of one model pay for their shared dense prefix once."""
    cfg_then_sg = Guidance(
        "cfg_then_sg",
        (Branch(conditional=False), Branch(sparsity=Constant(0.9)), Branch(sparsity=Constant(0.5))),
        weights=(-0.5, -1.5, 3.0),
    )
    cost = sample_cost(XL, cfg_then_sg, EULER40)
    passes = [pass_macs(XL, g) for g in (0.0, 0.9, 0.5)]
    assert cost.passes_per_step == 3 and cost.gflops_shared_per_step == 0  # labels differ: nothing shared
    assert cost.gflops_per_step == pytest.approx(sum(passes) / 1e9)
    assert cost.gflops_per_step == pytest.approx(114.42 + 97.67, rel=0.005)  # a dense pass + the paper's SG step
    sg3 = Guidance("sg3", tuple(Branch(sparsity=Constant(g)) for g in (0.9, 0.7, 0.5)), (-1.0, -1.0, 3.0))
    shared = sample_cost(XL, sg3, EULER40)
    unshared = sum(pass_macs(XL, g) for g in (0.9, 0.7, 0.5))
    first_routed = XL.shared_prefix_blocks([0.9, 0.7, 0.5])
    assert first_routed == 2  # route 2:24: blocks 0 and 1 are dense in every pass
    assert shared.gflops_per_step == pytest.approx((unshared - 2 * prefix_macs(XL, first_routed)) / 1e9)
