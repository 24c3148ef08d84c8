"""Router overhead: token selection, gather and scatter as a share of the routed step.

Two views of the same cost, both against the full routed step:

* isolated: ``select_tokens`` + ``route`` + ``unroute`` at the step's shapes (with
  their backward for training), timed interleaved with the full step;
* in place: the self time of the router's ops (selection: rand, sort, argsort,
  stack; gather, scatter and their backward kernels) in a torch.profiler trace of
  the full step.

Training draws masks from one device generator (as ``SiTModule``); sampling
passes draw them from one CPU generator per image (as ``generate``).

    python -m benchmarks.router                               # CPU defaults (~30 s on 2 cores)
    python -m benchmarks.router --model SiT-XL/2@32x4 --batch 32 --device cuda --amp bf16
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import timing
from benchmarks.workloads import Workload, build, inputs, parse_workload, sampling_step, train_step
from sgexp.diffusion import unguided
from sgexp.diffusion.seeds import routing_generators
from sgexp.models.routing import kept_tokens, route, select_tokens, unroute

CPU_DEFAULTS: list[tuple[Workload, int]] = [(Workload("SiT-Tiny/4"), 128), (Workload("SiT-S/4"), 16)]
AMP = {"none": None, "bf16": torch.bfloat16}
# Ops the router issues (forward and backward); everything else belongs to the blocks.
# route/unroute copy token rows (index_select, index_copy; backward index_add_, index_fill);
# selection draws scores (rand/uniform_, stack of per-image draws) and sorts them. The label
# embedding's B-row lookup and label dropout's B draws share some of these names: negligible
# next to the router's B×N×D copies.
ROUTER_OPS = frozenset(
    f"aten::{op}"
    for op in ("index_select", "index_copy", "index_copy_", "index_add_", "index_fill", "index_fill_")
    + ("gather", "scatter", "scatter_add_", "sort", "argsort", "rand", "uniform_", "stack")
)


def router_only(batch: int, tokens: int, keep: int, width: int, device, training: bool, dtype):
    """select + route + unroute (+ backward) at the shapes of one routed span."""
    x = torch.randn(batch, tokens, width, device=device, dtype=dtype, requires_grad=training)
    grad = torch.randn_like(x)
    generator = torch.Generator(device=device).manual_seed(0) if training else routing_generators(range(batch), 0)

    def call() -> None:
        idx = select_tokens(batch, tokens, keep, generator, device=device)
        kept = route(x, idx)
        out = unroute(x, kept, idx)
        if training:
            torch.autograd.grad(out, x, grad)

    return call


def profiled_share(fn, device: torch.device, calls: int = 3) -> dict:
    """Self time of the router's ops as a share of all self time in ``calls`` profiled steps."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(getattr(e, key) for e in events)
    router = {e.key: getattr(e, key) / calls / 1e6 for e in events if e.key in ROUTER_OPS}
    return {"share": sum(router.values()) * calls * 1e6 / total if total else float("nan"), "ops_s": router}


def measure(workload: Workload, batch: int, gamma: float, device, amp, repeats: int, warmup: int) -> list[dict]:
    model = build(workload, gamma, device)
    config = workload.config(gamma)
    x, labels = inputs(workload, batch, device)
    dtype = amp or torch.float32
    N, D = config.num_tokens, config.hidden_size
    cases = {
        f"train γ={gamma}": (train_step(model, x, labels, True, amp), True, gamma),
        "sample γ=0.5": (sampling_step(unguided(0.5), model, x, labels, amp), False, 0.5),
        "sample γ=0.9": (sampling_step(unguided(0.9), model, x, labels, amp), False, 0.9),
    }
    rows = []
    for case, (step, training, g) in cases.items():
        timing.log(f"router: {workload.label()} batch {batch} {case} ...")
        isolated = router_only(batch, N, kept_tokens(N, g), D, device, training, dtype)
        stats = timing.time_interleaved({"step": step, "router": isolated}, repeats, warmup, device=device)
        share = timing.paired_ratio(stats["router"], stats["step"])
        try:
            profiled = profiled_share(step, device)
        except Exception as err:  # noqa: BLE001 - a profiler failure must not lose the timings
            profiled = {"share": None, "error": repr(err)}
        rows.append(
            {
                "model": workload.name,
                "label": workload.label(),
                "batch": batch,
                "case": case,
                "kept_tokens": kept_tokens(N, g),
                "step_s": stats["step"].to_dict(),
                "router_s": stats["router"].to_dict(),
                "share_isolated": share.to_dict(),
                "share_profiled": profiled.get("share"),
                "profiled_ops_s": profiled.get("ops_s"),
                "profiler_error": profiled.get("error"),
            }
        )
    return rows


def table(rows: list[dict], title: str) -> None:
    timing.print_table(
        title,
        ["model", "batch", "case", "kept", "step ms", "router ms", "share (isolated)", "share (profiled)"],
        [
            (
                r["label"],
                r["batch"],
                r["case"],
                r["kept_tokens"],
                timing.fmt_ms(timing.Stats(tuple(r["step_s"]["samples"]))),
                timing.fmt_ms(timing.Stats(tuple(r["router_s"]["samples"]))),
                f"{timing.Stats(tuple(r['share_isolated']['samples'])).median:.2%}",
                "" if r["share_profiled"] is None else f"{r['share_profiled']:.2%}",
            )
            for r in rows
        ],
        caption="train: fwd+bwd, one device generator; sample: one unguided routed pass, per-image CPU generators",
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.router", description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="NAME[@SIZExCHANNELS], repeatable (default: CPU set)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--gamma", type=float, default=0.5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--amp", choices=list(AMP), default="none")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help=timing.THREADS_HELP)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    timing.set_threads(args.threads)
    device = torch.device(args.device)
    plan = (
        [(parse_workload(m), args.batch or 32) for m in args.model]
        if args.model
        else [(w, args.batch or b) for w, b in CPU_DEFAULTS]
    )
    rows = []
    for workload, batch in plan:
        rows.extend(measure(workload, batch, args.gamma, device, AMP[args.amp], args.repeats, args.warmup))
    table(rows, f"Router overhead ({device})")
    payload = {"benchmark": "router", "machine": timing.machine_info(device), "rows": rows}
    timing.log(f"wrote {timing.write_json('router', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
