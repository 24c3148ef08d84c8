"""Sampling step per guidance rule: measured seconds per sample against analytic GFLOPs.

One step = one ``guidance.evaluate`` (all passes of the rule at one t), with
per-image routing generators as in ``generate``. Rules: unguided, CFG (two
dense passes), SG(0.5, 0.9) with and without prefix sharing, CFG+SG(0, 0.5).
All rules of one (size, batch) are interleaved. Against CFG, the table gives
the measured time ratio (median of round-by-round ratios), the analytic FLOPs
ratio (attention included) and the realised fraction of the analytic saving,
(1 − t/t_CFG) / (1 − F/F_CFG).

    python -m benchmarks.sampling_step                        # CPU defaults (~1-2 min on 2 cores)
    python -m benchmarks.sampling_step --model SiT-XL/2@32x4 --batch 64 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import timing
from benchmarks.workloads import (
    AMP,
    CPU_DEFAULTS,
    SAMPLING_RULES,
    Workload,
    build,
    inputs,
    parse_workload,
    prefix_sharing_gain,
    rule_macs,
    sampling_step,
)
from sgexp.flops import peak_flops


def measure(
    workload: Workload,
    batch: int,
    device: torch.device,
    amp: torch.dtype | None,
    repeats: int,
    warmup: int,
    rules: dict | None = None,
) -> list[dict]:
    """One row per rule at (size, batch), all rules timed interleaved."""
    rules = rules or SAMPLING_RULES
    model = build(workload, 0.5, device)
    x, labels = inputs(workload, batch, device)
    variants = {name: sampling_step(rule, model, x, labels, amp) for name, rule in rules.items()}
    stats = timing.time_interleaved(variants, repeats, warmup, device=device)
    config = workload.config()
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    cfg_macs = rule_macs(config, rules["cfg"]) if "cfg" in rules else float("nan")
    rows = []
    for name, rule in rules.items():
        macs = rule_macs(config, rule)
        ratio = timing.paired_ratio(stats[name], stats["cfg"]) if "cfg" in rules else None
        rows.append(
            {
                "model": workload.name,
                "label": workload.label(),
                "batch": batch,
                "rule": name,
                "formula": str(rule),
                "share_prefix": rule.share_prefix and rule.shares_prefix(rule.passes(20, 40, 0.5)),
                "amp": str(amp) if amp else None,
                "step_s": stats[name].to_dict(),
                "seconds_per_sample": stats[name].median / batch,
                "samples_per_s": batch / stats[name].median,
                "gflops_per_sample_step": rule_macs(config, rule, include_attention=False) / 1e9,
                "gflops_per_sample_step_with_attention": macs / 1e9,
                "time_ratio_to_cfg": ratio.to_dict() if ratio else None,
                "flops_ratio_to_cfg": macs / cfg_macs,
                "saving_realised_fraction": timing.realised_fraction(ratio.median, macs / cfg_macs)
                if ratio and name != "cfg"
                else None,
                "mfu": batch * 2 * macs / stats[name].median / peak if peak else None,  # 2 FLOPs per MAC
            }
        )
    gain = prefix_sharing_gain(stats, config, rules)
    for row in rows:
        if row["rule"] == "sg":
            row["prefix_sharing"] = gain
    return rows


def table(rows: list[dict], title: str) -> None:
    def realised(r):
        return "" if r["saving_realised_fraction"] is None else f"{r['saving_realised_fraction']:.1%}"

    def ratio(r):
        return timing.fmt_range(timing.Stats(tuple(r["time_ratio_to_cfg"]["samples"])), 3)

    timing.print_table(
        title,
        [
            "model",
            "batch",
            "rule",
            "GFLOPs/sample",
            "ms/step",
            "ms/sample",
            "t / t_CFG",
            "F / F_CFG",
            "realised",
            "MFU",
        ],
        [
            (
                r["label"],
                r["batch"],
                r["rule"],
                f"{r['gflops_per_sample_step']:.4g}",
                timing.fmt_ms(timing.Stats(tuple(r["step_s"]["samples"]))),
                f"{r['seconds_per_sample'] * 1e3:.3g}",
                ratio(r),
                f"{r['flops_ratio_to_cfg']:.3f}",
                realised(r),
                timing.fmt_pct(r["mfu"]),
            )
            for r in rows
        ],
        caption="one sampling step (all passes of the rule); GFLOPs/sample: DiT convention (linear layers), "
        "F/F_CFG with attention; realised = (1 − t/t_CFG) / (1 − F/F_CFG); MFU: n/a without a known peak",
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampling_step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="NAME[@SIZExCHANNELS], repeatable (default: CPU set)")
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default: per model)")
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
        [(parse_workload(m), args.batch or [64]) for m in args.model]
        if args.model
        else [(w, args.batch or b) for w, b in CPU_DEFAULTS]
    )
    rows = []
    for workload, batches in plan:
        for batch in batches:
            timing.log(f"sampling_step: {workload.label()} batch {batch} ...")
            rows.extend(measure(workload, batch, device, AMP[args.amp], args.repeats, args.warmup))
    table(rows, f"Sampling step per rule ({device})")
    payload = {"benchmark": "sampling_step", "machine": timing.machine_info(device), "rows": rows}
    timing.log(f"wrote {timing.write_json('sampling_step', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
