"""Analytic cost model: GFLOPs per network pass, per sampling step, per sample.

Convention (DiT's, followed by the SG paper; DESIGN.md): one "FLOP" is one
multiply-accumulate of a linear layer, per image, per pass. Counted: patch
embedding, timestep MLP, every block's qkv / output projection / MLP at the
number of tokens that block actually processes, each block's adaLN modulation
(once per image, it acts on the conditioning vector), and the final layer. The
label embedding is a table lookup and costs nothing; norms, activations and
biases are ignored. Attention's QKᵀ and AV products (2·K²·D per block) are
left out unless ``include_attention``.

A step costs the sum of its passes, a sample the sum over its velocity
evaluations (``Sampler.evaluation_points``), each priced from the
``Guidance.passes`` the sampler would run. When the passes of a step share
their dense prefix (SG with ``share_prefix``, the default; see
``sgexp.diffusion.guidance``), what the prefix computes (patch embedding,
timestep MLP, blocks before the first routed block) is counted once: the
paper's SiT-XL/2 SG(0.5, 0.9) step costs 89.47 GFLOPs instead of 97.65
(``share_prefix=False`` / ``--no-share-prefix`` give the paper's convention).
ICG costs what CFG costs (two dense passes, 228.84 GFLOPs per step on SiT-XL/2,
the paper's ICG row): its branches differ in label, which adaLN carries into
every block, so nothing is shared.
This model is the source of truth for sweeps; ``tests/test_flops.py`` checks
it against ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs
per MAC).

    python -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 \\
        --route 2:24 --guidance sg --gamma-strong 0.5 --gamma-weak 0.9 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from sgexp.checks import fail
from sgexp.diffusion.guidance import RULES, Guidance, Pass, build_guidance, can_share_prefix, cfg
from sgexp.diffusion.sampler import SOLVERS, Sampler
from sgexp.models.dit import DiTConfig
from sgexp.models.layers import TIMESTEP_FREQUENCIES
from sgexp.models.routing import Route


def pass_macs(config: DiTConfig, sparsity: float | Sequence[float] = 0.0, include_attention: bool = False) -> float:
    """Multiply-accumulates of one forward pass for one image at sparsity γ."""
    D, N, depth = config.hidden_size, config.num_tokens, config.depth
    patch_dim = config.patch_size**2 * config.in_channels
    mlp = int(D * config.mlp_ratio)
    per_token = 3 * D * D + D * D + 2 * D * mlp  # qkv, attention projection, MLP (two layers)
    tokens = config.tokens_per_block(sparsity)

    macs = N * patch_dim * D  # patch embedding
    macs += TIMESTEP_FREQUENCIES * D + D * D  # timestep MLP
    macs += depth * D * 6 * D + D * 2 * D  # adaLN modulation of the blocks and the final layer
    macs += sum(tokens) * per_token  # the blocks, each at its own token count
    macs += N * D * patch_dim  # final linear layer
    if include_attention:
        macs += sum(2 * k * k * D for k in tokens)  # QKᵀ and attention·V
    return float(macs)


def prefix_macs(config: DiTConfig, num_blocks: int, include_attention: bool = False) -> float:
    """Multiply-accumulates of ``DiT.forward_prefix`` for one image: patch embedding,
    timestep MLP and blocks ``[0, num_blocks)`` on all N tokens (adaLN included).

    This is what a pass sharing its prefix with another does not recompute.
    """
    D, N = config.hidden_size, config.num_tokens
    patch_dim = config.patch_size**2 * config.in_channels
    per_token = 3 * D * D + D * D + 2 * D * int(D * config.mlp_ratio)
    macs = N * patch_dim * D + TIMESTEP_FREQUENCIES * D + D * D
    macs += num_blocks * (D * 6 * D + N * per_token)
    if include_attention:
        macs += num_blocks * 2 * N * N * D
    return float(macs)


def step_macs(
    configs: Mapping[str, DiTConfig], passes: Sequence[Pass], share_prefix: bool, include_attention: bool = False
) -> float:
    """Multiply-accumulates of one evaluation's passes, with or without prefix sharing."""
    macs = sum(pass_macs(configs[p.model], p.sparsity, include_attention) for p in passes)
    if share_prefix and can_share_prefix(list(passes)):  # the prefix runs once, not once per pass
        config = configs[passes[0].model]
        shared = config.shared_prefix_blocks([p.sparsity for p in passes])
        macs -= (len(passes) - 1) * prefix_macs(config, shared, include_attention)
    return macs


def train_flops(config: DiTConfig, sparsity: float | Sequence[float] | None = None) -> float:
    """Hardware FLOPs of one training step per image, for MFU: forward + backward ≈ 3 × forward,
    2 FLOPs per multiply-accumulate, attention products included. ``None``: γ_train of every route."""
    if sparsity is None:
        sparsity = tuple(r.sparsity for r in config.routes)
    return 2 * 3 * pass_macs(config, sparsity, include_attention=True)


# Dense bf16 tensor-core peaks (no structured sparsity), FLOP/s, matched against the CUDA device name
# in order (the first whose words all appear). H100 SXM and H200 share the same compute.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)
PEAK_ENV = "SGEXP_PEAK_TFLOPS"


def peak_flops(device_name: str | None, environ: Mapping[str, str] | None = None) -> float | None:
    """The accelerator's peak FLOP/s for MFU: ``$SGEXP_PEAK_TFLOPS`` if set, else ``PEAK_FLOPS`` by
    device name (``torch.cuda.get_device_name``); ``None`` when unknown (a CPU: no MFU)."""
    override = (os.environ if environ is None else environ).get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise fail(PEAK_ENV, override, "must be a number of TFLOP/s, e.g. 989") from None
        if not value > 0:
            raise fail(PEAK_ENV, override, "must be > 0 TFLOP/s")
        return value * 1e12
    for key, peak in PEAK_FLOPS if device_name else ():
        if all(part in device_name for part in key.split()):
            return peak
    return None


def gflops_per_pass(
    config: DiTConfig, sparsity: float | Sequence[float] = 0.0, include_attention: bool = False
) -> float:
    return pass_macs(config, sparsity, include_attention) / 1e9


@dataclass(frozen=True)
class SampleCost:
    """Cost of generating one sample with a rule and a sampler (GFLOPs = 1e9 MACs)."""

    gflops_per_pass_dense: float
    gflops_per_step: float
    gflops_per_sample: float
    passes_per_step: float
    evaluations_per_step: int
    share_prefix: bool = False
    gflops_shared_per_step: float = 0.0  # not recomputed thanks to prefix sharing (0 without)


def sample_cost(
    configs: Mapping[str, DiTConfig] | DiTConfig,
    rule: Guidance,
    sampler: Sampler,
    include_attention: bool = False,
    share_prefix: bool | None = None,
) -> SampleCost:
    """Price ``rule`` under ``sampler`` without running it.

    ``configs`` maps the model names of the rule (``"main"``, ``"weak"``) to their
    configs; a single config stands for ``"main"`` (and ``"weak"`` if needed).
    Per-step numbers are averages over the steps (schedules vary by step).
    ``share_prefix``: ``None`` prices the rule as the sampler runs it
    (``rule.share_prefix``); ``False`` gives the paper's convention (every pass in full).
    """
    if isinstance(configs, DiTConfig):
        configs = {"main": configs, "weak": configs}
    share = rule.share_prefix if share_prefix is None else share_prefix
    cache: dict[tuple[Pass, ...], tuple[float, float]] = {}
    total = unshared = 0.0
    passes = 0
    points = sampler.evaluation_points()
    for step, t in points:
        key = tuple(rule.passes(step, sampler.num_steps, t))
        if key not in cache:
            cache[key] = (
                step_macs(configs, key, share, include_attention),
                step_macs(configs, key, False, include_attention),
            )
        total += cache[key][0]
        unshared += cache[key][1]
        passes += len(key)
    steps = sampler.num_steps
    return SampleCost(
        gflops_per_pass_dense=pass_macs(configs["main"], 0.0, include_attention) / 1e9,
        gflops_per_step=total / steps / 1e9,
        gflops_per_sample=total / 1e9,
        passes_per_step=passes / steps,
        evaluations_per_step=len(points) // steps,
        share_prefix=share,
        gflops_shared_per_step=(unshared - total) / steps / 1e9,
    )


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgexp.flops", description="Analytic GFLOPs of a guided sampler.")
    ap.add_argument("--model", default="SiT-XL/2", help="registry name, e.g. SiT-XL/2, SiT-B/2, SiT-Tiny/4")
    ap.add_argument("--image-size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--channels", type=int, default=4, help="network input channels (4 = SD-VAE latents)")
    ap.add_argument(
        "--latent-factor",
        type=int,
        default=None,
        help="pixels per latent side; default 8 with 4 channels (SD-VAE: 256px -> 32x32x4), else 1",
    )
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument(
        "--route",
        action="append",
        default=None,
        help="start:end inclusive, repeatable; default: the size's TREAD route; 'none' for no route",
    )
    ap.add_argument("--guidance", default="none", choices=list(RULES))
    ap.add_argument("--scale", type=float, default=2.0, help="guidance scale w (> 1 runs both branches)")
    ap.add_argument("--gamma-strong", default="0", help="γ of the strong branch: number or cosine:START:END")
    ap.add_argument("--gamma-weak", default="0", help="γ of the weak branch: number or cosine:START:END")
    ap.add_argument("--interval", default=None, help="guidance interval t_lo:t_hi")
    ap.add_argument("--weak-model", default=None, help="registry name of the AutoGuidance weak model")
    ap.add_argument("--solver", default="euler", choices=SOLVERS)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--include-attention", action="store_true", help="add QKᵀ and AV products")
    ap.add_argument(
        "--no-share-prefix",
        action="store_true",
        help="price every pass in full (the paper's convention); by default SG's branches share their dense prefix",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def _config(name: str, args: argparse.Namespace) -> DiTConfig:
    factor = args.latent_factor or (8 if args.channels == 4 else 1)
    if args.image_size % factor:
        raise ValueError(f"image_size={args.image_size} is invalid: must be divisible by latent_factor={factor}")
    if args.route is None:
        routes = "default"
    elif args.route == ["none"]:
        routes = ()
    else:
        routes = tuple(Route.parse(r) for r in args.route)
    return DiTConfig.from_name(
        name,
        input_size=args.image_size // factor,
        in_channels=args.channels,
        num_classes=args.num_classes,
        routes=routes,
    )


def report(args: argparse.Namespace) -> dict:
    config = _config(args.model, args)
    configs = {"main": config, "weak": _config(args.weak_model, args) if args.weak_model else config}
    interval = tuple(float(v) for v in args.interval.split(":")) if args.interval else None
    scale = args.scale if args.guidance != "none" else 1.0
    rule = build_guidance(
        args.guidance, scale, args.gamma_strong, args.gamma_weak, interval, share_prefix=not args.no_share_prefix
    )
    sampler = Sampler(args.solver, args.steps)
    cost = sample_cost(configs, rule, sampler, args.include_attention)
    baseline = sample_cost(configs, cfg(max(scale, 2.0)), sampler, args.include_attention)
    return {
        "model": args.model,
        "input_size": config.input_size,
        "in_channels": config.in_channels,
        "tokens": config.num_tokens,
        "routes": [f"{r.start}:{r.end}" for r in config.routes],
        "guidance": rule.to_dict(),
        "guidance_formula": str(rule),
        "solver": sampler.solver,
        "steps": sampler.num_steps,
        "include_attention": args.include_attention,
        **asdict(cost),
        "relative_to_cfg": cost.gflops_per_sample / baseline.gflops_per_sample,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = report(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} {result['input_size']}²×{result['in_channels']}, routes {result['routes']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("guidance", result["guidance_formula"])
    for key in ("gflops_per_pass_dense", "gflops_per_step", "gflops_per_sample", "passes_per_step", "relative_to_cfg"):
        table.add_row(key, f"{result[key]:.4g}")
    if result["gflops_shared_per_step"] > 0:  # the paper's convention next to the shared-prefix price
        unshared = result["gflops_per_step"] + result["gflops_shared_per_step"]
        table.add_row("gflops_per_step without prefix sharing", f"{unshared:.4g}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
