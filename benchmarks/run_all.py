"""Run the CPU benchmark set (``make bench``): training step, sampling step, router, evaluation, data resume,
bootstrap intervals.

Each benchmark prints its table and writes ``<results>/<name>.json``; this entry
point adds ``summary.json`` with the headline numbers (realised fractions of the
analytic savings, router share, throughputs, data-resume times) and says whether
the 90% goals hold.

    python -m benchmarks.run_all                       # ~7 min on 2 cores, 1 thread, + the bootstrap intervals
    python -m benchmarks.run_all --quick               # tiny sizes, 3 repeats: a smoke run
    python -m benchmarks.run_all --threads 0           # torch's default thread count (a quiet machine)
"""

from __future__ import annotations

import argparse
import time

from benchmarks import bootstrap, data_resume, eval_throughput, router, sampling_step, timing, train_step

GOAL = 0.9  # routed training and SG sampling should realise >= 90% of the analytic saving


def summarise(
    train: dict, sampling: dict, routing: dict, evaluation: dict | None, data: dict, intervals: dict | None = None
) -> dict:
    rows = []
    for r in train["rows"]:
        rows.append(
            {
                "what": f"train {r['model']} b{r['batch']}: routed vs dense",
                "realised": r["saving_realised_fraction"],
                "speedup": r["speedup_measured"],
                "analytic": r["speedup_analytic"],
                "goal": True,
            }
        )
    for r in sampling["rows"]:
        if r["rule"] in ("sg", "sg_unshared", "cfg_sg", "none"):
            rows.append(
                {
                    "what": f"sample {r['model']} b{r['batch']}: {r['rule']} vs cfg",
                    "realised": r["saving_realised_fraction"],
                    "speedup": 1.0 / r["time_ratio_to_cfg"]["median"],
                    "analytic": 1.0 / r["flops_ratio_to_cfg"],
                    "goal": r["rule"] == "sg",
                }
            )
    for r in sampling["rows"]:
        gain = r.get("prefix_sharing")
        if gain:
            rows.append(
                {
                    "what": f"sample {r['model']} b{r['batch']}: sg shared vs unshared prefix",
                    "realised": gain["saving_realised_fraction"],
                    "speedup": 1.0 / gain["time_ratio"]["median"],
                    "analytic": 1.0 / gain["flops_ratio"],
                    "goal": False,
                }
            )
    met = all(r["realised"] is not None and r["realised"] >= GOAL for r in rows if r["goal"])
    return {
        "goal_realised_fraction": GOAL,
        "goal_met": met,
        "rows": rows,
        "router_share": [
            {"what": f"{r['model']} b{r['batch']} {r['case']}", "share": r["share_isolated"]["median"]}
            for r in routing["rows"]
        ],
        "eval": [
            {"what": r["what"], "per_second": r["per_second"]["median"], "unit": r["unit"]} for r in evaluation["rows"]
        ]
        if evaluation
        else [],
        # seconds to the first batch after a resume: flat in the step (one window of shards read)
        "data_resume": {
            "seconds": {str(r["start_batch"]): r["seconds"]["median"] for r in data["rows"]},
            "ratio_1e6_to_10": data["ratio_1e6_to_10"]["median"],
        },
        # seconds sgexp.evaluate adds per setting (bootstrap=1000) and for two settings with their pair
        "bootstrap": [
            {
                "what": f"{r['samples']} x {r['dim']} ({r['method']})",
                "fid_interval_seconds": r["fid_interval_seconds"],
                "two_settings_and_pair_seconds": r["two_settings_and_pair_seconds"],
            }
            for r in intervals["rows"]
        ]
        if intervals
        else [],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help=timing.THREADS_HELP)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smallest sizes, 3 repeats (a smoke run)")
    ap.add_argument("--skip-eval", action="store_true", help="leave out the evaluation-throughput benchmark")
    ap.add_argument("--skip-bootstrap", action="store_true", help="leave out the bootstrap-interval benchmark")
    ap.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    common = ["--repeats", str(3 if args.quick else args.repeats), "--warmup", "1"]
    common += ["--threads", str(args.threads)]
    common += ["--out", args.out] if args.out else []
    quick_model = ["--model", "SiT-Micro/4@16x4", "--batch", "16"]
    start = time.perf_counter()
    train = train_step.main(common + (quick_model if args.quick else []))
    sampling = sampling_step.main(common + (quick_model if args.quick else []))
    routing = router.main(common + (quick_model if args.quick else []))
    evaluation = None
    if not args.skip_eval:
        eval_args = ["--batch", "8", "--steps", "2", "--inception-batch", "2"] if args.quick else []
        evaluation = eval_throughput.main(common + eval_args)
    data = data_resume.main(common + (["--shards", "8", "--samples", "100"] if args.quick else []))
    intervals = None
    if not args.skip_bootstrap:
        quick_sizes = ["--sizes", "1000,5000", "--dim", "256", "--n-boot", "200"]
        intervals = bootstrap.main((quick_sizes if args.quick else []) + (["--out", args.out] if args.out else []))
    summary = summarise(train, sampling, routing, evaluation, data, intervals)
    summary["seconds"] = time.perf_counter() - start
    if args.quick:  # tiny models are overhead-bound, not compute-bound: the goal does not apply
        summary["goal_met"] = None
    timing.print_table(
        f"Realised fraction of the analytic saving (goal ≥ {GOAL:.0%} for routed training and SG)",
        ["comparison", "measured speedup", "analytic speedup", "realised"],
        [
            (
                r["what"] + ("" if r["goal"] else " (no goal)"),
                f"{r['speedup']:.3f}×",
                f"{r['analytic']:.3f}×",
                "" if r["realised"] is None else f"{r['realised']:.1%}",
            )
            for r in summary["rows"]
        ],
        caption=(
            "goal not assessed (--quick: tiny sizes are not compute-bound)"
            if summary["goal_met"] is None
            else f"goal met: {summary['goal_met']}"
        )
        + f"; {summary['seconds']:.0f} s in all",
    )
    payload = {"benchmark": "summary", "machine": timing.machine_info("cpu"), **summary}
    timing.log(f"wrote {timing.write_json('summary', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
