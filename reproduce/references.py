"""Numbers the report quotes from elsewhere: the papers, the project's benchmarks and DESIGN.md.

One table, each entry with its source, so that the prose of ``docs/results.md`` never types a
number that this run did not measure. Paper values are from ``docs/paper-facts.md`` (SiT-XL/2 on
ImageNet-256, FID-50k, GFLOPs per sampling step).
"""

from __future__ import annotations

# The SG paper ("Guiding Token-Sparse Diffusion Models", arXiv 2601.01608), docs/paper-facts.md.
PAPER = {
    "model": "SiT-XL/2",
    "depth": 28,
    "route": (2, 24),  # TREAD route of the paper's model, blocks start→end inclusive
    "fid_cfg": 2.57,
    "fid_sg_flops": 2.14,  # SG_FLOPS: the same model as its own weak branch, γ = (0.5, 0.9)
    "sg_flops_gammas": (0.5, 0.9),
    "gflops_dense_step": 114.42,
    "gflops_sg_flops_step": 97.67,
    "figure6_scales": (1.3, 1.5, 1.7, 1.9),  # the (γ_s, γ_w) FID heatmaps of Figure 6
    "rule_of_thumb": {"gamma_strong": (0.4, 0.6), "gamma_weak": (0.6, 0.8)},
}

# `make bench` on a 2-core EPYC, one thread (README, "Measured"): routed vs dense training step.
# Measured on 2026-12-02 (python -m benchmarks.train_step, 1 thread, batch 128: 1841 vs 1087 ms, analytic 1.620x).
CPU_BENCH = {"model": "SiT-Tiny/4", "input": "32×32×4", "batch": 128, "cores": 1, "routed_speedup": 1.706}

# DESIGN.md: unguided and SG FIDs of the MNIST model vary by about ±5 between sample seeds at 1,000
# samples; the verdicts scale it by sqrt(1000 / n) for n samples.
FID_NOISE = {"fid": 5.0, "samples": 1000}
