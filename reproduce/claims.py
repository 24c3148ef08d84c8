"""Which of the papers' claims hold at this scale: one line per claim, with its verdict and numbers.

Every verdict is computed from the record with rules fixed before the run. Two settings scored in one
evaluation share their sample indices (common random numbers), and ``sgexp.evaluate`` gives each pair
a paired bootstrap interval of the FID difference (``sgexp.eval.bootstrap``; the record's rows carry it
under ``paired``): the difference counts when that interval excludes 0. For rows from different
evaluations (other models, other stages) the fallback is the seed-to-seed noise that DESIGN.md measured
on this kind of model (``references.FID_NOISE``: ±5 FID at 1,000 samples), scaled by
sqrt(1000 / samples) for other sample counts. Smaller differences are reported as inconclusive,
whichever way they point. Numbers quoted from the papers and benchmarks come from ``references``.
"""

from __future__ import annotations

import math

from reproduce.references import CPU_BENCH, FID_NOISE, PAPER
from sgexp.diffusion.guidance import RULES
from sgexp.eval.bootstrap import sign

MISSING = "_not run yet_"


def noise(samples: int) -> float:
    return FID_NOISE["fid"] * math.sqrt(FID_NOISE["samples"] / samples)


def paired_ci(x: dict, y: dict) -> list[float] | None:
    """The paired interval of FID(x) − FID(y) when both rows come from one evaluation, else None."""
    entry = (x.get("paired") or {}).get(y.get("setting"))
    return entry["ci"] if entry else None


def verdict(gain: float, samples: int, ci: list[float] | None = None) -> str:
    """``gain`` is how much lower (better) the FID the claim predicts is; positive supports the claim.

    ``ci``: the paired interval of that same difference (``paired_ci``), which decides when given;
    otherwise the ±noise rule."""
    if ci is not None:
        word = {1: "holds", -1: "does not hold", 0: "inconclusive"}[sign(ci)]
        return f"**{word}** (difference {gain:+.1f}, paired interval [{ci[0]:+.1f}, {ci[1]:+.1f}])"
    m = noise(samples)
    if gain > m:
        return "**holds**"
    if gain < -m:
        return "**does not hold**"
    return f"**inconclusive** (difference {gain:+.1f} is within the ±{m:.1f} seed noise)"


def setting(r: dict) -> str:
    """A guidance setting as the tables print it: ``SG w=5, γ=(0.5, 0.9)``."""
    label = RULES[r["rule"]].label
    if r["rule"] == "none":
        return label + (f", γ={r['gamma_strong']:g}" if r["gamma_strong"] else "")
    gammas = f", γ=({r['gamma_strong']:g}, {r['gamma_weak']:g})" if r["rule"] != "cfg" else ""
    return f"{label} w={r['scale']:g}{gammas}"


def _pair(gammas: tuple[float, float]) -> str:
    return f"({gammas[0]:g}, {gammas[1]:g})"


def _paper_route() -> str:
    start, end = PAPER["route"]
    return f"{start}→{end} of {PAPER['depth']} blocks"


def claims(record: dict) -> list[str]:
    """The "Which claims hold" section: every claim this run can test, then the limits of the evidence."""
    out = training_claims(record) + guidance_claims(record) + heatmap_claims(record) + sweep_claims(record)
    if not out:
        return ["## Which claims hold at this scale", "", MISSING, ""]
    t = record["training"].get("tread")
    if t:
        routed = sum(int(e) - int(s) + 1 for s, e in (r.split("@")[0].split(":") for r in t["routes"]))
        start, end = PAPER["route"]
        model = (
            f"a model of {t['depth']} blocks and {t['tokens']} tokens routed {', '.join(t['routes'])}: its routes "
            f"cover {routed / t['depth']:.0%} of the blocks, against {(end - start + 1) / PAPER['depth']:.0%} in "
            f"{PAPER['model']} (route {_paper_route()}), so its sparse passes save a little less"
        )
    else:
        model = "a small model"
    caveats = [
        f"Limits of this evidence: one training seed per model and one set of sample seeds; {model}; domain FID "
        "on small digits rather than Inception FID on ImageNet. A verdict here says what happens at this scale, "
        "not whether the paper is right at its own.",
    ]
    return ["## Which claims hold at this scale", "", *out, "", *caveats, ""]


def training_claims(record: dict) -> list[str]:
    p, final, train, out = record["preset"], record["final"], record["training"], []
    if "tread" in final and "dense" in final:
        t, d = final["tread"]["fid"], final["dense"]["fid"]
        out.append(
            "- TREAD: routing half the tokens past the middle blocks during training gives a better model at the "
            f"same number of steps: {verdict(d - t, p['curve_samples'])}: unguided FID {t:.1f} (TREAD) vs {d:.1f} "
            f"(dense) after {p['steps']:,} steps."
        )
    if "tread" in train and "dense" in train:
        a, b = train["tread"]["train_gflops_per_image"], train["dense"]["train_gflops_per_image"]
        bench = CPU_BENCH
        out.append(
            f"- TREAD: a routed training step is cheaper: **holds** by construction: {a:.4f} vs {b:.4f} forward "
            f"GFLOPs per training image ({a / b:.2f}×). Measured step times are in `make bench` ({bench['model']} "
            f"on {bench['input']}, batch {bench['batch']}, {bench['cores']} core: routed "
            f"{bench['routed_speedup']:.2f}× faster); the stage wall times of section 1 are not comparable (the "
            "stages shared a busy machine)."
        )
    return out


def guidance_claims(record: dict) -> list[str]:
    p, g, out = record["preset"], record["guidance"], []
    n = p["table_samples"]
    if "none" in g and "none_sparse" in g:
        a, b = g["none"], g["none_sparse"]
        out.append(
            "- SG paper: without guidance (w = 1), test-time sparsity degrades the samples: "
            f"{verdict(b['fid'] - a['fid'], n, paired_ci(b, a))}: FID {a['fid']:.1f} at γ=0 vs {b['fid']:.1f} at "
            f"γ={b['gamma_strong']:g}."
        )
    sg, cfg, cfg_sg = ([r for r in g.values() if r["rule"] == rule] for rule in ("sg", "cfg", "cfg_sg"))
    if sg and "none" in g:
        best = min(sg, key=lambda r: r["fid"])
        holds = verdict(g["none"]["fid"] - best["fid"], n, paired_ci(g["none"], best))
        out.append(
            f"- SG improves on the unguided model: {holds}: best SG "
            f"({setting(best)}) FID {best['fid']:.1f} vs unguided {g['none']['fid']:.1f}."
        )
    if sg and cfg:
        bs, bc = min(sg, key=lambda r: r["fid"]), min(cfg, key=lambda r: r["fid"])
        out.append(
            f"- SG paper (SG_FLOPS, γ = {_pair(PAPER['sg_flops_gammas'])}): SG reaches a lower FID than CFG "
            f"({PAPER['fid_sg_flops']:.2f} vs {PAPER['fid_cfg']:.2f} on ImageNet): "
            f"{verdict(bc['fid'] - bs['fid'], n, paired_ci(bc, bs))}: best SG ({setting(bs)}) FID {bs['fid']:.1f} "
            f"vs best CFG ({setting(bc)}) {bc['fid']:.1f}, at "
            f"{bs['gflops_per_sample'] / bc['gflops_per_sample']:.2f}× its GFLOPs."
        )
    if sg and "none" in g:
        rel = sg[0]["gflops_per_sample"] / g["none"]["gflops_per_sample"]
        t = record["training"].get("tread")
        where = f"route {', '.join(t['routes'])} in {t['depth']} blocks here" if t else "this model's route"
        sparse, dense = PAPER["gflops_sg_flops_step"], PAPER["gflops_dense_step"]
        # the paper counts both passes in full; sgexp runs SG's dense prefix once (gflops_per_sample)
        full = sg[0].get("gflops_per_sample_unshared")
        rel_full = full / g["none"]["gflops_per_sample"] if full is not None else None
        paper_way = f"; counted the paper's way, both passes in full, {full:.3f} ({rel_full:.2f}×)" if full else ""
        holds = "**holds**" if (rel if rel_full is None else rel_full) < 1 else "**does not hold** on this model"
        out.append(
            f"- SG paper: SG at γ = {_pair(PAPER['sg_flops_gammas'])} costs less than one dense pass per step "
            f"({sparse:.2f} vs {dense:.2f} GFLOPs on {PAPER['model']}, {sparse / dense:.2f}×, both passes counted "
            f"in full): {holds}: {sg[0]['gflops_per_sample']:.3f} "
            f"vs {g['none']['gflops_per_sample']:.3f} GFLOPs per sample as run, with the dense prefix shared "
            f"({rel:.2f}×){paper_way}, and {sg[0]['relative_to_cfg']:.2f}× CFG. The saving depends on how much of the "
            f"network the route covers: {where}, {_paper_route()} in {PAPER['model']}."
        )
    parts, matches, cfg_at = [], [], {c["scale"]: c for c in cfg}
    for r in sorted(cfg_sg, key=lambda r: r["scale"]):
        if (c := cfg_at.get(r["scale"])) is not None:
            # matches or better: not clearly worse (its paired interval reaches 0, or within the noise)
            ci = paired_ci(c, r)
            matches.append(ci[1] >= 0 if ci is not None else c["fid"] - r["fid"] > -noise(n))
            where = f", paired interval of CFG − CFG+SG [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci is not None else ""
            parts.append(
                f"w={r['scale']:g}: {r['fid']:.1f} vs CFG {c['fid']:.1f} at {r['relative_to_cfg']:.2f}× its GFLOPs"
                + where
            )
    if matches:
        text = "**holds**" if all(matches) else "**does not hold**"
        out.append(
            "- CFG+SG (Eq. 8) keeps CFG's quality at fewer FLOPs (matches within the noise or better): "
            f"{text}: " + "; ".join(parts) + "."
        )
    return out


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
    at_w2 = {(r["gamma_strong"], r["gamma_weak"]): r for r in maps[-1][1]}
    old_best = at_w2[(b1["gamma_strong"], b1["gamma_weak"])]
    gain, ci = old_best["fid"] - b2["fid"], paired_ci(old_best, b2)  # one evaluation: paired when recorded
    if s1 == s2:
        moves = "**does not hold** (the same best cell)"
    elif ci is not None and sign(ci) <= 0:
        moves = (
            f"**inconclusive** (at w={w2:g} the two best cells differ by {gain:.1f}, paired interval "
            f"[{ci[0]:+.1f}, {ci[1]:+.1f}])"
        )
    elif ci is None and gain <= noise(n):
        moves = f"**inconclusive** (at w={w2:g} the two best cells differ by {gain:.1f}, within ±{noise(n):.1f})"
    else:
        moves = "**holds**" if s2 > s1 else "**does not hold** (it moves to lower sparsity)"
    (s_lo, s_hi), (w_lo, w_hi) = PAPER["rule_of_thumb"]["gamma_strong"], PAPER["rule_of_thumb"]["gamma_weak"]
    thumb = [b for _, b in best if s_lo <= b["gamma_strong"] <= s_hi and w_lo <= b["gamma_weak"] <= w_hi]
    return [
        f"- SG paper (Figure 6): the best FID stays about the same as w grows (within the noise): {same} "
        f"(best cells {where}; difference {diff:.1f} vs ±{noise(n):.1f} noise at {n} samples).",
        f"- SG paper (Figure 6): the low-FID valley moves to higher sparsity as w grows: {moves}; γ_s + γ_w of the "
        f"best cell {s1:g} at w={w1:g} → {s2:g} at w={w2:g}.",
        f"- SG paper rule of thumb γ_s {s_lo:g}–{s_hi:g}, γ_w {w_lo:g}–{w_hi:g}: the best cell lies there for "
        f"{len(thumb)} of {len(best)} values of w.",
    ]


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
            detail += (
                f"; re-scored on {p['sweep_final_samples']} samples: {'confirmed' if confirmed else 'not confirmed'}"
            )
    if "paired interval" in (v.get("decided_by") or []):
        detail += f". Decided by paired bootstrap intervals on {p['sweep_samples']} common samples."
    else:
        detail += (
            f". Screening FIDs on {p['sweep_samples']} samples carry about ±{noise(p['sweep_samples']):.0f} of noise."
        )
    return [f"{claim}: {text} ({v.get('n_better', 0)} of {v.get('n_candidates', 0)} SG trials): {detail}"]
