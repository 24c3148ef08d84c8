"""Training step, dense vs TREAD-routed: measured speedup against the analytic FLOPs ratio.

For each model size and batch, one set of weights runs forward + loss +
backward densely (γ = 0) and routed (γ_train over the size's default span),
interleaved. The table shows both step times (median [min–max]), the measured
speedup (median of round-by-round ratios), the analytic speedup (FLOPs with
attention products: what the hardware executes) and the realised fraction of
the analytic saving, (1 − t_routed/t_dense) / (1 − F_routed/F_dense).

    python -m benchmarks.train_step                           # CPU defaults (~1-2 min on 2 cores)
    python -m benchmarks.train_step --model SiT-B/2@32x4 --batch 32 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import timing
from benchmarks.workloads import AMP, CPU_DEFAULTS, Workload, build, inputs, parse_workload, train_macs, train_step
from sgexp.flops import pass_macs, peak_flops, train_flops


def measure(
    workload: Workload,
    batch: int,
    gamma: float,
    device: torch.device,
    amp: torch.dtype | None,
    repeats: int,
    warmup: int,
) -> dict:
    """Interleaved dense/routed step times and the analytic ratios for one (size, batch)."""
    model = build(workload, gamma, device)
    x0, labels = inputs(workload, batch, device)
    variants = {"dense": train_step(model, x0, labels, False, amp), "routed": train_step(model, x0, labels, True, amp)}
    stats = timing.time_interleaved(variants, repeats, warmup, device=device)
    ratio = timing.paired_ratio(stats["routed"], stats["dense"])
    config = workload.config(gamma)
    analytic = train_macs(config, gamma) / train_macs(config, 0.0)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    convention = pass_macs(config, gamma) / pass_macs(config, 0.0)  # DiT convention: linear layers only
    return {
        "model": workload.name,
        "label": workload.label(),
        "input": [workload.channels, workload.input_size, workload.input_size],
        "tokens": config.num_tokens,
        "route": [config.routes[0].start, config.routes[0].end],
        "gamma": gamma,
        "batch": batch,
        "amp": str(amp) if amp else None,
        "dense_s": stats["dense"].to_dict(),
        "routed_s": stats["routed"].to_dict(),
        "time_ratio": ratio.to_dict(),
        "speedup_measured": 1.0 / ratio.median,
        "flops_ratio_analytic": analytic,
        "flops_ratio_linear_only": convention,
        "speedup_analytic": 1.0 / analytic,
        "speedup_realised": (1.0 / ratio.median) / (1.0 / analytic),
        "saving_realised_fraction": timing.realised_fraction(ratio.median, analytic),
        "train_gflops_per_image_dense": train_macs(config, 0.0) / 1e9,
        "train_gflops_per_image_routed": train_macs(config, gamma) / 1e9,
        # model FLOP/s (2 per MAC, attention included) / peak: None without a known peak (CPU, unless
        # $SGEXP_PEAK_TFLOPS is set)
        "mfu_dense": batch * train_flops(config, 0.0) / stats["dense"].median / peak if peak else None,
        "mfu_routed": batch * train_flops(config, gamma) / stats["routed"].median / peak if peak else None,
    }


def table(rows: list[dict], title: str) -> None:
    timing.print_table(
        title,
        [
            "model",
            "batch",
            "dense ms",
            "routed ms",
            "speedup",
            "analytic",
            "measured/analytic",
            "saving realised",
            "MFU d/r",
        ],
        [
            (
                r["label"],
                r["batch"],
                timing.fmt_ms(timing.Stats(tuple(r["dense_s"]["samples"]))),
                timing.fmt_ms(timing.Stats(tuple(r["routed_s"]["samples"]))),
                f"{r['speedup_measured']:.3f}×",
                f"{r['speedup_analytic']:.3f}×",
                f"{r['speedup_realised']:.1%}",
                f"{r['saving_realised_fraction']:.1%}",
                f"{timing.fmt_pct(r['mfu_dense'])} / {timing.fmt_pct(r['mfu_routed'])}",
            )
            for r in rows
        ],
        caption="fwd+bwd per step, median [min–max] over interleaved repeats; analytic = FLOPs incl. attention "
        "(3× forward); saving realised = (1 − t_r/t_d) / (1 − F_r/F_d); MFU: n/a without a known peak "
        "($SGEXP_PEAK_TFLOPS)",
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="NAME[@SIZExCHANNELS], repeatable (default: CPU set)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: per model)")
    ap.add_argument("--gamma", type=float, default=0.5, help="γ_train of the routed variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=list(AMP), default="none")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help=timing.THREADS_HELP)
    ap.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    timing.set_threads(args.threads)
    device = torch.device(args.device)
    plan = (
        [(parse_workload(m), args.batch or [32]) for m in args.model]
        if args.model
        else [(w, args.batch or b) for w, b in CPU_DEFAULTS]
    )
    rows = []
    for workload, batches in plan:
        for batch in batches:
            timing.log(f"train_step: {workload.label()} batch {batch} ...")
            rows.append(measure(workload, batch, args.gamma, device, AMP[args.amp], args.repeats, args.warmup))
    table(rows, f"Training step, dense vs routed γ={args.gamma} ({device})")
    payload = {"benchmark": "train_step", "machine": timing.machine_info(device), "rows": rows}
    timing.log(f"wrote {timing.write_json('train_step', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
