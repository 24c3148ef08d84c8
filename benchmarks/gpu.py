"""GPU benchmark: SiT-B/2 and SiT-XL/2 training and sampling throughput in bf16, eager and compiled (one GPU, ~8 min).

Sized for one H100/H200 and a hard limit of 10 minutes; a time budget
(``--budget-s``, default 480 s of measurement) skips what would not fit, and every
measurement fails soft (an OOM or a kernel error is recorded, the rest goes on).
The JSON is rewritten after every measurement, so a killed run keeps what it had.

1. Training (issue 7 included): forward + loss + backward under bf16 autocast,
   dense vs routed at γ = 0.5 (B/2: route 2→8, XL/2: 2→24), 256px latents
   (4×32×32, 1000 classes), at batch 32 and a larger batch; images/s, measured vs
   analytic speedup, MFU = model FLOPs (3 × 2 × forward MACs, attention included,
   from ``sgexp.flops``) per second / the GPU's dense bf16 peak.
2. Sampling: one guided step (all passes of the rule) for unguided, CFG,
   SG(0.5, 0.9) with and without prefix sharing, CFG+SG(0, 0.5), at batch 64 and
   256; images/s per step and the realised fraction of the analytic saving vs CFG.
3. Router: select + gather + scatter (+ backward) alone, as a share of the routed step.
4. Compiled (``DiT.compile_core``, as ``trainer.compile`` trains): SiT-XL/2 training at batch 32 and the
   CFG (both branches in one batched call) and SG (shared prefix) steps at batch 64, right after their
   eager rows; the time of each graph's first call (compilation + one step) is recorded apart.

Compared variants are interleaved (A B B A ...), timed with CUDA events.

    PYTHONPATH=. python -m benchmarks.gpu                # on the GPU machine (or: bash benchmarks/gpu.sh)
    PYTHONPATH=. python -m benchmarks.gpu --smoke        # tiny sizes, any device: checks the script runs
    (--smoke on a CPU compiles with aot_eager: the compiled rows' graphs, checked in seconds)
"""

from __future__ import annotations

import argparse
import gc
import signal
import time
import traceback

import torch

from benchmarks import timing
from benchmarks.router import router_only
from benchmarks.workloads import (
    SAMPLING_RULES,
    Workload,
    build,
    inputs,
    parse_workload,
    prefix_sharing_gain,
    rule_macs,
    sampling_step,
    train_macs,
    train_step,
)
from sgexp.flops import pass_macs, peak_flops
from sgexp.models.routing import kept_tokens


def peak_for(device: torch.device, override_tflops: float | None) -> tuple[float, str]:
    """The peak for MFU (``sgexp.flops.peak_flops``: by GPU name, or ``$SGEXP_PEAK_TFLOPS``) and how it was found."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_flops(name)
    if peak is None:
        return float("nan"), f"unknown for '{name}': pass --peak-tflops" if name else "none (not a GPU: no MFU)"
    return peak, f"{peak / 1e12:g} TFLOP/s dense bf16 (matched '{name}')" if name else f"{peak / 1e12:g} TFLOP/s"


class Run:
    """Collects results, writes the JSON after each, enforces the time budget."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.start = time.perf_counter()
        self.peak, self.peak_note = peak_for(device, args.peak_tflops)
        self.results: dict[str, list] = {"train": [], "sampling": [], "router": []}
        self.skipped: list[str] = []
        self.errors: list[dict] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, what: str, estimate_s: float) -> bool:
        if self.elapsed() + estimate_s > self.args.budget_s:
            self.skipped.append(f"{what} (at {self.elapsed():.0f} s, needs ~{estimate_s:.0f} s)")
            timing.log(f"  skip {what}: budget")
            return False
        return True

    def attempt(self, section: str, what: str, fn) -> None:
        timing.log(f"[{self.elapsed():6.1f} s] {section}: {what}")
        try:
            rows = fn()
            self.results[section].extend(rows)
        except Exception as err:  # noqa: BLE001 - fail soft: record, free memory, go on
            message = f"{type(err).__name__}: {err}"
            timing.log(f"  FAILED {what}: {message.splitlines()[0][:300]}")
            trace = traceback.format_exc()[-4000:]
            self.errors.append({"section": section, "what": what, "error": message[:2000], "trace": trace})
        finally:
            gc.collect()  # drop the failed measurement's model before the next one allocates
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.save()

    def save(self) -> None:
        payload = {
            "benchmark": "gpu",
            "smoke": self.args.smoke,
            "machine": timing.machine_info(self.device),
            "peak_flops": self.peak,
            "peak_assumed": self.peak_note,
            "amp": "bfloat16 autocast",
            "seconds": self.elapsed(),
            **self.results,
            "skipped": self.skipped,
            "errors": self.errors,
        }
        timing.write_json("gpu_smoke" if self.args.smoke else "gpu", payload, self.args.out)


def mfu(run: Run, flops_per_image: float, images_per_s: float) -> float:
    return flops_per_image * images_per_s / run.peak


def train_rows(run: Run, workload: Workload, batch: int, compiled: bool = False) -> list[dict]:
    args, device = run.args, run.device
    model = build(workload, 0.5, device)
    x0, labels = inputs(workload, batch, device)
    compile_model(run, model, compiled)
    dense = train_step(model, x0, labels, False, torch.bfloat16)
    routed = train_step(model, x0, labels, True, torch.bfloat16)
    # The first call of each graph compiles it: timed apart, once (compile + one step).
    compile_s = (
        {k: timing.time_call(f, device) for k, f in (("dense", dense), ("routed", routed))} if compiled else None
    )
    stats = timing.time_interleaved({"dense": dense, "routed": routed}, args.repeats, args.warmup, device=device)
    config = workload.config(0.5)
    ratio = timing.paired_ratio(stats["routed"], stats["dense"])
    analytic = train_macs(config, 0.5) / train_macs(config, 0.0)
    row = {
        "model": workload.name,
        "label": workload.label(),
        "batch": batch,
        "compiled": compiled,
        "first_call_s": compile_s,
        "speedup_measured": 1.0 / ratio.median,
        "speedup_analytic": 1.0 / analytic,
        "speedup_analytic_linear_only": pass_macs(config, 0.0) / pass_macs(config, 0.5),
        "saving_realised_fraction": timing.realised_fraction(ratio.median, analytic),
        "time_ratio": ratio.to_dict(),
    }
    for name, gamma in (("dense", 0.0), ("routed", 0.5)):
        flops = 2 * train_macs(config, gamma)  # FLOPs = 2 × MACs; training = 3 × forward
        rate = stats[name].inverse(batch)
        row[name] = {
            "step_s": stats[name].to_dict(),
            "images_per_s": rate.to_dict(),
            "train_gflops_per_image": flops / 1e9,
            "mfu": mfu(run, flops, rate.median),
        }
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del model, dense, routed
    return [row]


def compile_model(run: Run, model, compiled: bool) -> bool:
    """``DiT.compile_core`` as training uses it (``--compile-backend``, ``--compile-mode``), if ``compiled``."""
    if compiled:
        model.compile_core(backend=run.args.compile_backend, mode=run.args.compile_mode)
    return compiled


def sampling_rows(run: Run, workload: Workload, batch: int, compiled: bool = False) -> list[dict]:
    args, device = run.args, run.device
    model = build(workload, 0.5, device)
    compile_model(run, model, compiled)
    x, labels = inputs(workload, batch, device)
    # Compiled: CFG (both branches batched into one call) against SG (shared prefix), one graph each.
    rules = {k: SAMPLING_RULES[k] for k in ("cfg", "sg")} if compiled else SAMPLING_RULES
    variants = {name: sampling_step(rule, model, x, labels, torch.bfloat16) for name, rule in rules.items()}
    compile_s = {name: timing.time_call(step, device) for name, step in variants.items()} if compiled else None
    stats = timing.time_interleaved(variants, args.repeats, args.warmup, device=device)
    config = workload.config()
    cfg_macs = rule_macs(config, SAMPLING_RULES["cfg"])
    rows = []
    for name, rule in rules.items():
        ratio = timing.paired_ratio(stats[name], stats["cfg"])
        macs = rule_macs(config, rule)
        rate = stats[name].inverse(batch)
        rows.append(
            {
                "model": workload.name,
                "label": workload.label(),
                "batch": batch,
                "compiled": compiled,
                "first_call_s": compile_s[name] if compile_s else None,
                "rule": name,
                "formula": str(rule),
                "step_s": stats[name].to_dict(),
                "images_per_s": rate.to_dict(),
                "gflops_per_image_step": rule_macs(config, rule, include_attention=False) / 1e9,
                "mfu": mfu(run, 2 * macs, rate.median),
                "time_ratio_to_cfg": ratio.to_dict(),
                "flops_ratio_to_cfg": macs / cfg_macs,
                "saving_realised_fraction": None
                if name == "cfg"
                else timing.realised_fraction(ratio.median, macs / cfg_macs),
            }
        )
    gain = prefix_sharing_gain(stats, config, rules)
    for row in rows:
        if row["rule"] == "sg":
            row["prefix_sharing"] = gain
    del model, variants
    return rows


def router_rows(run: Run, workload: Workload, batch: int) -> list[dict]:
    args, device = run.args, run.device
    model = build(workload, 0.5, device)
    config = workload.config(0.5)
    x, labels = inputs(workload, batch, device)
    N, D = config.num_tokens, config.hidden_size
    sg = SAMPLING_RULES["sg"]
    cases = {
        "train γ=0.5 (fwd+bwd)": (train_step(model, x, labels, True, torch.bfloat16), True, (0.5,)),
        "sample SG(0.5, 0.9) step": (sampling_step(sg, model, x, labels, torch.bfloat16), False, (0.5, 0.9)),
    }
    rows = []
    for case, (step, training, gammas) in cases.items():
        calls = [router_only(batch, N, kept_tokens(N, g), D, device, training, torch.float32) for g in gammas]

        def routers(calls=calls) -> None:
            for call in calls:
                call()

        stats = timing.time_interleaved({"step": step, "router": routers}, args.repeats, args.warmup, device=device)
        share = timing.paired_ratio(stats["router"], stats["step"])
        rows.append(
            {
                "model": workload.name,
                "batch": batch,
                "case": case,
                "step_s": stats["step"].to_dict(),
                "router_s": stats["router"].to_dict(),
                "share": share.to_dict(),
            }
        )
    del model
    return rows


def print_tables(run: Run) -> None:
    r = run.results
    if r["train"]:
        timing.print_table(
            "Training fwd+bwd, bf16 autocast: dense vs routed γ=0.5",
            ["model", "batch", "compiled", "dense img/s", "routed img/s", "speedup", "analytic", "realised", "MFU d/r"],
            [
                (
                    t["label"],
                    t["batch"],
                    t["compiled"],
                    f"{t['dense']['images_per_s']['median']:.0f}",
                    f"{t['routed']['images_per_s']['median']:.0f}",
                    f"{t['speedup_measured']:.3f}×",
                    f"{t['speedup_analytic']:.3f}×",
                    f"{t['saving_realised_fraction']:.1%}",
                    f"{timing.fmt_pct(t['dense']['mfu'])} / {timing.fmt_pct(t['routed']['mfu'])}",
                )
                for t in r["train"]
            ],
            caption=f"MFU: model FLOPs incl. attention / peak {run.peak_note}",
        )
    if r["sampling"]:
        timing.print_table(
            "Sampling step per rule, bf16 autocast",
            [
                "model",
                "batch",
                "compiled",
                "rule",
                "GFLOPs/img",
                "ms/step",
                "img/s",
                "t/t_CFG",
                "F/F_CFG",
                "realised",
                "MFU",
            ],
            [
                (
                    s["label"],
                    s["batch"],
                    s["compiled"],
                    s["rule"],
                    f"{s['gflops_per_image_step']:.4g}",
                    timing.fmt_ms(timing.Stats(tuple(s["step_s"]["samples"]))),
                    f"{s['images_per_s']['median']:.0f}",
                    f"{s['time_ratio_to_cfg']['median']:.3f}",
                    f"{s['flops_ratio_to_cfg']:.3f}",
                    "" if s["saving_realised_fraction"] is None else f"{s['saving_realised_fraction']:.1%}",
                    timing.fmt_pct(s["mfu"]),
                )
                for s in r["sampling"]
            ],
            caption="img/s = images per second through one step (a 40-step sample takes 40 of them)",
        )
    if r["router"]:
        timing.print_table(
            "Router overhead",
            ["model", "batch", "case", "step ms", "router ms", "share"],
            [
                (
                    x["model"],
                    x["batch"],
                    x["case"],
                    timing.fmt_ms(timing.Stats(tuple(x["step_s"]["samples"]))),
                    timing.fmt_ms(timing.Stats(tuple(x["router_s"]["samples"]))),
                    f"{x['share']['median']:.2%}",
                )
                for x in r["router"]
            ],
        )
    for line in run.skipped:
        timing.log(f"skipped: {line}")
    for e in run.errors:
        timing.log(f"error: {e['section']} {e['what']}: {e['error'].splitlines()[0][:300]}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and repeats on any device (a test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 10; smoke 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per variant (default 3; smoke 1)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="start no measurement that would end after this")
    ap.add_argument(
        "--hard-limit-s", type=int, default=560, help="abort the running measurement at this point (SIGALRM)"
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    ap.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend (default inductor; aot_eager for --smoke on a CPU)",
    )
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (1 if args.smoke else 10)
    args.warmup = args.warmup or (1 if args.smoke else 3)
    device = torch.device(args.device)
    # inductor builds C++ kernels on a CPU for minutes; aot_eager checks the same graphs in seconds
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke and device.type != "cuda" else "inductor")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the few fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    run = Run(args, device)
    run.save()
    if hasattr(signal, "SIGALRM") and args.hard_limit_s > 0:
        # A measurement (a compilation, most likely) that runs past the hard limit raises here; attempt()
        # records it and the budget check skips the rest, so the JSON and the tables still come out.
        def abort(signum, frame):
            raise TimeoutError(f"hard limit of {args.hard_limit_s} s reached")

        signal.signal(signal.SIGALRM, abort)
        signal.alarm(args.hard_limit_s)
    machine = timing.machine_info(device)
    timing.log(f"device: {machine.get('gpu', machine['cpu_model'])}; torch {torch.__version__}; peak {run.peak_note}")

    measures = {
        "train": lambda w, b, c: train_rows(run, w, b, compiled=c),
        "sampling": lambda w, b, c: sampling_rows(run, w, b, compiled=c),
        "router": lambda w, b, c: router_rows(run, w, b),
    }
    if args.smoke:
        tiny = parse_workload("SiT-Micro/4@16x4")
        plan = [(section, False, tiny, 2, 0.0) for section in measures]
        plan += [(section, True, tiny, 2, 0.0) for section in ("train", "sampling")]
    else:
        b2, xl2 = parse_workload("SiT-B/2@32x4"), parse_workload("SiT-XL/2@32x4")
        # (section, compiled, workload, batch, rough seconds on an H200, checked against the budget before
        # starting). The claims first: SiT-XL/2 training at batch 32 and the SG step at batch 64, eager
        # and compiled (fwd+bwd dense and routed graphs, the CFG and SG step graphs: minutes of compilation).
        plan = [
            ("train", False, xl2, 32, 10),
            ("train", True, xl2, 32, 200),
            ("sampling", False, xl2, 64, 15),
            ("sampling", True, xl2, 64, 120),
            ("train", False, b2, 32, 8),
            ("train", False, b2, 256, 12),
            ("train", False, xl2, 128, 20),
            ("sampling", False, b2, 256, 12),
            ("sampling", False, xl2, 256, 30),
            ("router", False, xl2, 32, 8),
            ("train", True, b2, 32, 90),
        ]
    if args.no_compile:
        plan = [p for p in plan if not p[1]]
    for section, compiled, workload, batch, estimate in plan:
        what = f"{workload.label()} batch {batch}" + (" compiled" if compiled else "")
        if run.fits(f"{section} {what}", estimate):
            run.attempt(section, what, lambda m=measures[section], w=workload, b=batch, c=compiled: m(w, b, c))
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    run.save()
    print_tables(run)
    timing.log(f"done in {run.elapsed():.0f} s; wrote {timing.results_dir(args.out)}")
    return {"results": run.results, "errors": run.errors, "skipped": run.skipped}


if __name__ == "__main__":
    main()
