"""docs/results.md: the tables, the figures, the commands, and which of the paper's claims hold.

Every verdict is computed from the record with one rule, fixed before the run: a difference in FID
counts only when it exceeds the seed-to-seed noise that DESIGN.md measured on this kind of model
(±5 FID at 1,000 samples), scaled by sqrt(1000 / samples) for other sample counts. Smaller
differences are reported as inconclusive, whichever way they point.
"""

from __future__ import annotations

import math
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

from sgexp.reproduce.plan import ROOT

NOISE_AT_1000 = 5.0  # DESIGN.md: unguided/SG FIDs vary by ~±5 between sample seeds at 1,000 samples
MISSING = "_not run yet_"


def noise(samples: int) -> float:
    return NOISE_AT_1000 * math.sqrt(1000 / samples)


def verdict(gain: float, samples: int) -> str:
    """``gain`` is how much lower (better) the FID the claim predicts is; positive supports the claim."""
    m = noise(samples)
    if gain > m:
        return "**holds**"
    if gain < -m:
        return "**does not hold**"
    return f"**inconclusive** (difference {gain:+.1f} is within the ±{m:.1f} seed noise)"


def _f(value, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _setting(r: dict) -> str:
    if r["rule"] == "none":
        return "unguided" + (f", γ={r['gamma_strong']:g}" if r["gamma_strong"] else "")
    names = {"cfg": "CFG", "sg": "SG", "cfg_sg": "CFG+SG"}
    gammas = f", γ=({r['gamma_strong']:g}, {r['gamma_weak']:g})" if r["rule"] != "cfg" else ""
    return f"{names.get(r['rule'], r['rule'])} w={r['scale']:g}{gammas}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------- sections


def models_line(record: dict) -> str:
    p, t = record["preset"], record["training"].get("tread")
    what = f"{p['steps']:,} steps each"
    if t:
        r = t["resolution"]
        what = (
            f"{t['model_name']} on {r}×{r} ({t['tokens']} tokens, depth {t['depth']}, width {t['width']}), "
            f"TREAD route {', '.join(t['routes'])} (blocks start:end inclusive @ γ_train) vs no routing; "
            f"{p['steps']:,} steps each at batch {t['batch_size']}"
        )
    return (
        f"- Models: `experiment=mnist_tread` and `experiment=mnist_dense` with the preset's overrides: {what}, "
        f"seed {p['seed']}, no wall-clock limit, so both models see exactly the same steps and images."
    )


def setup(record: dict, invocation: str, work: str) -> list[str]:
    p = record["preset"]
    lines = [
        f"# Reproduction at {'MNIST-5k' if p['dataset'] == 'mnist5k' else p['dataset']} scale",
        "",
        f"Written by `{invocation}` on {datetime.now():%Y-%m-%d %H:%M} (commit {_git_commit()}, preset "
        f"`{p['name']}`). Every number below comes from the pipeline's stages under `{work}/`; "
        "nothing was tuned after seeing results: the settings, grids and sample counts are fixed in "
        "`sgexp/reproduce/plan.py`.",
        "",
    ]
    if record["pending"]:
        steps = [f"{n} at step {s or 0:,} of {p['steps']:,}" for n, s in record.get("progress", {}).items()]
        lines += [f"**Partial report**: stages not finished yet: {', '.join(record['pending'])}.", ""]
        lines += [f"Trainings in progress: {'; '.join(steps)}.", ""] if steps else []
    lines += [
        "## Setup",
        "",
        f"- Data: `{p['dataset']}`; FID is *domain FID*: Fréchet distance in the features of the dataset's own "
        "small CNN classifier against the held-out split (not comparable to Inception FID).",
        models_line(record),
        f"- Sampling: Euler, {p['sampler_steps']} steps, EMA weights. Every evaluation uses sample indices "
        f"0..n−1 with seed {p['seed']}: the same noise, labels and routing masks for every setting.",
        f"- Samples: {p['table_samples']:,} per setting of the guidance table, {p['curve_samples']:,} per point of "
        f"the training curves (their last points are the TREAD-vs-dense comparison), {p['heatmap_samples']:,} per "
        "heatmap cell; "
        f"the sweep screens on {p['sweep_samples']:,} and re-scores its Pareto set on {p['sweep_final_samples']:,}.",
        f"- Noise rule for the verdicts: an FID difference counts when it exceeds ±{NOISE_AT_1000:g} at 1,000 "
        "samples (DESIGN.md's seed-to-seed spread), scaled by √(1000/n).",
        "- GFLOPs are the analytic count of `sgexp.flops` (multiply-accumulates of the linear layers, the paper's "
        "convention), per generated sample over all sampling steps, for what runs: SG's two branches share their "
        "dense prefix (block 0 and the embeddings here), which is counted once (the paper counts every pass in full).",
        "",
    ]
    return lines


def tread_vs_dense(record: dict, figures: dict) -> list[str]:
    p, final, train = record["preset"], record["final"], record["training"]
    lines = ["## 1. TREAD vs dense training at the same number of steps", ""]
    rows = []
    for model in ("tread", "dense"):
        r, t = final.get(model), train.get(model)
        rows.append([
            "TREAD" if model == "tread" else "dense",
            _f(t["steps"], "{:,}") if t else MISSING,
            _f(r["fid"]) if r else MISSING,
            _f(r["class_accuracy"], "{:.3f}") if r else "-",
            _f(r["precision"], "{:.3f}") if r else "-",
            _f(r["recall"], "{:.3f}") if r else "-",
            _f(t["train_gflops_per_image"], "{:.4f}") if t else "-",
            _f(t["seconds"] / 60, "{:.1f}") if t else "-",
        ])  # fmt: skip
    header = [
        "training", "steps", f"unguided FID ({p['curve_samples']:,})", "class acc.", "precision", "recall",
        "fwd GFLOPs / train image", "train stage wall min",
    ]  # fmt: skip
    lines += _table(header, rows)
    lines += [
        "",
        "The wall time is that of the whole training stage (start-up, validation, checkpoints and end-of-training "
        "sample grids included) with the two trainings running side by side, one core each, on a machine shared "
        "with other jobs: a rough indication only; the analytic forward cost is exact.",
        "",
    ]
    if figures.get("tread_vs_dense"):
        lines += ["![TREAD vs dense](results_tread_vs_dense.png)", ""]
        curve = {m: sorted(pts, key=lambda x: x["step"]) for m, pts in record["curve"].items()}
        steps = sorted({pt["step"] for pts in curve.values() for pt in pts})
        by = {m: {pt["step"]: pt for pt in pts} for m, pts in curve.items()}
        header = ["step", *(f"{m} FID ({p['curve_samples']})" for m in ("tread", "dense"))]
        rows = [
            [f"{s:,}", *(_f(by[m][s]["fid"]) if s in by[m] else MISSING for m in ("tread", "dense"))] for s in steps
        ]
        lines += _table(header, rows) + [""]
    return lines


def guidance(record: dict, figures: dict) -> list[str]:
    p, rows = record["preset"], list(record["guidance"].values())
    lines = ["## 2. Guidance on the TREAD model", ""]
    if not rows:
        return lines + [MISSING, ""]
    header = ["setting", f"FID ({p['table_samples']:,})", "precision", "recall", "class acc.", "GFLOPs/sample"]
    header += ["× CFG cost", "s/sample"]
    table = [
        [_setting(r), _f(r["fid"]), _f(r["precision"], "{:.3f}"), _f(r["recall"], "{:.3f}"),
         _f(r["class_accuracy"], "{:.3f}"), _f(r["gflops_per_sample"], "{:.3f}"), _f(r["relative_to_cfg"], "{:.2f}"),
         _f(r["seconds_per_sample"], "{:.3f}")]
        for r in rows
    ]  # fmt: skip
    lines += _table(header, table)
    lines += [
        "",
        "Seconds per sample were measured with one thread while other stages and other jobs shared the machine: "
        "compare GFLOPs, not seconds.",
        "",
    ]
    if figures.get("guidance"):
        lines += ["![FID against GFLOPs per sample](results_guidance.png)", ""]
    return lines


def heatmaps(record: dict, figures: dict) -> list[str]:
    p = record["preset"]
    lines = ["## 3. Sparsity heatmaps and the Pareto front", "", "### FID over (γ_strong, γ_weak) at two w", ""]
    if not record["heatmaps"]:
        lines += [MISSING, ""]
    else:
        lines += [
            f"SG (Eq. 7, both branches conditional) on the TREAD model, {p['heatmap_samples']} samples per cell. "
            "Cells with γ_strong ≥ γ_weak are empty: constant SG needs γ_s < γ_w. The paper's Figure 6 shows the "
            "same map on ImageNet for w ∈ {1.3, …, 1.9}; on this model SG needs a larger w (DESIGN.md), so the "
            f"two maps use w ∈ {{{', '.join(f'{s:g}' for s in p['heatmap_scales'])}}}.",
            "",
        ]
        if figures.get("heatmap"):
            lines += ["![FID heatmaps](results_heatmap.png)", ""]
        gammas = p["heatmap_gammas"]
        for scale, rows in sorted(record["heatmaps"].items(), key=lambda kv: float(kv[0])):
            cell = {(r["gamma_strong"], r["gamma_weak"]): r["fid"] for r in rows}
            table = [[f"γ_s={s:g}", *(_f(cell.get((s, w))) for w in gammas)] for s in gammas[:-1]]
            lines += [f"w = {float(scale):g}:", ""] + _table(["", *(f"γ_w={w:g}" for w in gammas)], table) + [""]
    lines += ["### Pareto front of the `sparsity_pareto` study", ""]
    sweep = record.get("sweep")
    if not sweep:
        return lines + [MISSING, ""]
    s = sweep["summary"]
    lines += [
        f"`sparsity_pareto` (SG over w ∈ [1, 8], γ_s ∈ [0, 0.9], γ_w ∈ (γ_s, 0.95]; TPE) with {s['n_trials']} "
        f"trials, its 6 baselines (unguided, CFG 1.5/2/3, SG (0.5, 0.9) at 1.5 and 5) included; trials screened "
        f"on {p['sweep_samples']} samples, the Pareto set re-scored on {p['sweep_final_samples']}.",
        "",
    ]
    if figures.get("pareto"):
        lines += ["![Pareto front](results_pareto.png)", ""]
    header = ["trial", "setting", f"screening FID ({p['sweep_samples']})", f"final FID ({p['sweep_final_samples']})"]
    header += ["GFLOPs/sample"]
    table = []
    for r in s["pareto"]:
        r = {**r, "rule": r["family"], "gamma_strong": r["gamma_strong"] or 0.0, "gamma_weak": r["gamma_weak"] or 0.0}
        table.append(
            [str(r["number"]), _setting(r), _f(r["fid"]), _f(r["fid_final"]), _f(r["gflops_per_sample"], "{:.3f}")]
        )
    return lines + _table(header, table) + [""]


# --------------------------------------------------------------------------- claims


def claims(record: dict) -> list[str]:
    """One line per claim of the papers that this run can test, with its verdict and numbers."""
    p, g, final = record["preset"], record["guidance"], record["final"]
    n, out = p["table_samples"], []

    def add(claim: str, text: str) -> None:
        out.append(f"- {claim}: {text}")

    if "tread" in final and "dense" in final:
        t, d = final["tread"]["fid"], final["dense"]["fid"]
        add(
            "TREAD: routing half the tokens past the middle blocks during training gives a better model at the "
            "same number of steps",
            f"{verdict(d - t, p['curve_samples'])}: unguided FID {t:.1f} (TREAD) vs {d:.1f} (dense) after "
            f"{p['steps']:,} steps.",
        )
    train = record["training"]
    if "tread" in train and "dense" in train:
        a, b = train["tread"], train["dense"]
        add(
            "TREAD: a routed training step is cheaper",
            f"**holds** by construction: {a['train_gflops_per_image']:.4f} vs {b['train_gflops_per_image']:.4f} "
            f"forward GFLOPs per training image ({a['train_gflops_per_image'] / b['train_gflops_per_image']:.2f}×). "
            "Measured step times are in `make bench` (SiT-Tiny/4 on 32×32×4, batch 128, 1 core: routed 1.34× "
            "faster); the stage wall times of section 1 are not comparable (the stages shared a busy machine).",
        )
    if "none" in g and "none_sparse" in g:
        a, b = g["none"], g["none_sparse"]
        add(
            "SG paper: without guidance (w = 1), test-time sparsity degrades the samples",
            f"{verdict(b['fid'] - a['fid'], n)}: FID {a['fid']:.1f} at γ=0 vs {b['fid']:.1f} at "
            f"γ={b['gamma_strong']:g}.",
        )
    sg = [r for r in g.values() if r["rule"] == "sg"]
    cfg = [r for r in g.values() if r["rule"] == "cfg"]
    cfg_sg = [r for r in g.values() if r["rule"] == "cfg_sg"]
    if sg and "none" in g:
        best = min(sg, key=lambda r: r["fid"])
        add(
            "SG improves on the unguided model",
            f"{verdict(g['none']['fid'] - best['fid'], n)}: best SG ({_setting(best)}) FID {best['fid']:.1f} vs "
            f"unguided {g['none']['fid']:.1f}.",
        )
    if sg and cfg:
        bs, bc = min(sg, key=lambda r: r["fid"]), min(cfg, key=lambda r: r["fid"])
        add(
            "SG paper (SG_FLOPS, γ = (0.5, 0.9)): SG reaches a lower FID than CFG (2.14 vs 2.57 on ImageNet)",
            f"{verdict(bc['fid'] - bs['fid'], n)}: best SG ({_setting(bs)}) FID {bs['fid']:.1f} vs best CFG "
            f"({_setting(bc)}) {bc['fid']:.1f}, at {bs['gflops_per_sample'] / bc['gflops_per_sample']:.2f}× its "
            "GFLOPs.",
        )
        rel = sg[0]["gflops_per_sample"] / g["none"]["gflops_per_sample"] if "none" in g else None
        t = record["training"].get("tread")
        where = f"route {', '.join(t['routes'])} in {t['depth']} blocks here" if t else "this model's route"
        if rel is not None:
            text = "**holds**" if rel < 1 else "**does not hold** on this model"
            add(
                "SG paper: SG at γ = (0.5, 0.9) costs less than one dense pass per step (97.67 vs 114.42 GFLOPs on "
                "SiT-XL/2, 0.85×)",
                f"{text}: {sg[0]['gflops_per_sample']:.3f} vs {g['none']['gflops_per_sample']:.3f} GFLOPs per sample "
                f"({rel:.2f}×) and {sg[0]['relative_to_cfg']:.2f}× CFG. The saving depends on how much of the network "
                f"the route covers: {where}, 2→24 of 28 blocks in SiT-XL/2.",
            )
    if cfg_sg and cfg:
        parts, gains = [], []
        for r in sorted(cfg_sg, key=lambda r: r["scale"]):
            twin = [c for c in cfg if c["scale"] == r["scale"]]
            if twin:
                c = twin[0]
                gains.append(c["fid"] - r["fid"])
                parts.append(
                    f"w={r['scale']:g}: {r['fid']:.1f} vs CFG {c['fid']:.1f} at {r['relative_to_cfg']:.2f}× its GFLOPs"
                )
        if gains:
            worst = min(gains)
            text = "**holds**" if worst > -noise(n) else "**does not hold**"
            add(
                "CFG+SG (Eq. 8) keeps CFG's quality at fewer FLOPs (matches within the noise or better)",
                f"{text}: " + "; ".join(parts) + ".",
            )
    out += heatmap_claims(record)
    out += sweep_claims(record)
    if not out:
        return ["## Which claims hold at this scale", "", MISSING, ""]
    t = record["training"].get("tread")
    model = f"a {t['depth']}-block, {t['tokens']}-token model routed {', '.join(t['routes'])}" if t else "a small model"
    caveats = [
        f"Limits of this evidence: one training seed per model and one set of sample seeds; {model}, so sparse "
        "passes save far less than on SiT-XL/2 (route 2→24 of 28 blocks); domain FID on small digits rather than "
        "Inception FID on ImageNet. A verdict here says what happens at this scale, not whether the paper is right "
        "at its own.",
    ]
    return ["## Which claims hold at this scale", "", *out, "", *caveats, ""]


def sweep_claims(record: dict) -> list[str]:
    sweep, p = record.get("sweep"), record["preset"]
    if not sweep:
        return []
    claim = "- Sweep: some SG point beats the best CFG point on FID at fewer GFLOPs"
    v = sweep["summary"].get("sg_beats_best_cfg", {})
    if v.get("answer") is None:
        return [f"{claim}: no answer ({v.get('reason')})."]
    bc, pt = v["best_cfg"], v.get("point")
    text = "**holds**" if v["answer"] else "**does not hold**"
    detail = f"best CFG trial w={bc['scale']:g}: screening FID {bc['fid']:.1f}, {bc['gflops_per_sample']:.3f} GFLOPs"
    if pt:
        detail += (
            f"; best SG point below both: w={pt['scale']:.2f}, γ=({pt['gamma_strong']:.2f}, {pt['gamma_weak']:.2f}), "
            f"screening FID {pt['fid']:.1f}, {pt['gflops_per_sample']:.3f} GFLOPs"
        )
        confirmed = v.get("confirmed_with_final_fid")
        if confirmed is not None:
            state = "confirmed" if confirmed else "not confirmed"
            detail += f"; re-scored on {p['sweep_final_samples']} samples: {state}"
    detail += f". Screening FIDs on {p['sweep_samples']} samples carry about ±{noise(p['sweep_samples']):.0f} of noise."
    return [f"{claim}: {text} ({v.get('n_better', 0)} of {v.get('n_candidates', 0)} SG trials): {detail}"]


def heatmap_claims(record: dict) -> list[str]:
    maps = sorted(record["heatmaps"].items(), key=lambda kv: float(kv[0]))
    if len(maps) < 2:
        return []
    n = record["preset"]["heatmap_samples"]
    best = [(float(scale), min(rows, key=lambda r: r["fid"])) for scale, rows in maps]
    (w1, b1), (w2, b2) = best[0], best[-1]
    where = "; ".join(f"w={w:g}: FID {b['fid']:.1f} at γ=({b['gamma_strong']:g}, {b['gamma_weak']:g})" for w, b in best)
    diff = abs(b1["fid"] - b2["fid"])
    same = "**holds**" if diff <= noise(n) else "**does not hold**"
    s1, s2 = b1["gamma_strong"] + b1["gamma_weak"], b2["gamma_strong"] + b2["gamma_weak"]
    # The valley moved only if, at the larger w, the smaller w's best cell is clearly worse than the new best.
    at_w2 = {(r["gamma_strong"], r["gamma_weak"]): r["fid"] for r in maps[-1][1]}
    gain = at_w2[(b1["gamma_strong"], b1["gamma_weak"])] - b2["fid"]
    if s1 == s2:
        moves = "**does not hold** (the same best cell)"
    elif gain <= noise(n):
        moves = f"**inconclusive** (at w={w2:g} the two best cells differ by {gain:.1f}, within ±{noise(n):.1f})"
    else:
        moves = "**holds**" if s2 > s1 else "**does not hold** (it moves to lower sparsity)"
    thumb = [b for _, b in best if 0.4 <= b["gamma_strong"] <= 0.6 and 0.6 <= b["gamma_weak"] <= 0.8]
    return [
        f"- SG paper (Figure 6): the best FID stays about the same as w grows (within the noise): {same} "
        f"(best cells {where}; "
        f"difference {diff:.1f} vs ±{noise(n):.1f} noise at {n} samples).",
        f"- SG paper (Figure 6): the low-FID valley moves to higher sparsity as w grows: {moves}; γ_s + γ_w of the "
        f"best cell {s1:g} at w={w1:g} → {s2:g} at w={w2:g}.",
        f"- SG paper rule of thumb γ_s 0.4–0.6, γ_w 0.6–0.8: the best cell lies there for {len(thumb)} of {len(best)} "
        "values of w.",
    ]


def commands(record: dict, work: str) -> list[str]:
    lines = [
        "## Regenerate",
        "",
        "```bash",
        "make reproduce                                   # the whole pipeline; re-run to resume after an interruption",
        "make reproduce ARGS=--report-only                # rewrite this page from the finished stages",
        "make reproduce PRESET=smoke                      # the same pipeline in ~1 minute (digits, tiny model)",
        "```",
        "",
        f"`make reproduce PRESET={record['preset']['name']}` runs `.venv/bin/python -m sgexp.reproduce --preset "
        f"{record['preset']['name']}`. Each stage runs one of the commands below in its own process "
        f"with `OMP_NUM_THREADS=1` (two at a time), writes its log to `{work}/logs/<stage>.log` and a "
        f"marker to `{work}/stages/<stage>.json` when it finishes; finished stages are skipped and an "
        "interrupted training resumes from its `last.ckpt` (the command then ends with `resume=...`).",
        "",
        "<details><summary>The commands of every stage</summary>",
        "",
        "```bash",
    ]
    for name, command in record["commands"].items():  # paths relative to the repository, as a reader runs them
        lines += [f"# {name}", command.replace(f"{ROOT}/", "").replace(f"={ROOT} ", "=. ")]
    return lines + ["```", "", "</details>", ""]


def write(record: dict, figures: dict, path: Path, invocation: str, work: Path) -> Path:
    where = str(work.relative_to(ROOT)) if work.is_relative_to(ROOT) else str(work)
    lines = setup(record, invocation, where)
    lines += claims(record)
    lines += tread_vs_dense(record, figures)
    lines += guidance(record, figures)
    lines += heatmaps(record, figures)
    lines += commands(record, where)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def invocation_of(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", "-m", "sgexp.reproduce", *argv])
