"""docs/results.md: the setup, which of the papers' claims hold (``claims``), the tables and figures,
and the commands of every stage. Paths are written relative to the repository."""

from __future__ import annotations

import math
import os
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

import yaml

from reproduce import stages
from reproduce.claims import MISSING, claims, setting
from reproduce.references import FID_NOISE, PAPER
from reproduce.stages import ROOT, STUDY, interpreter, rel


def _f(value, fmt: str = "{:.1f}") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return fmt.format(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


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


def _shared_prefix(record: dict) -> str:
    """What SG's two branches share on the TREAD model: the embeddings and the blocks before its route."""
    t = record["training"].get("tread")
    if not t:
        return "the embeddings and the blocks before the route"
    n = t["prefix_blocks"]
    return "the embeddings" + {0: "", 1: " and block 0"}.get(n, f" and blocks 0–{n - 1}")


def setup(record: dict, invocation: str, work: str) -> list[str]:
    p = record["preset"]
    lines = [
        f"# Reproduction at {'MNIST-5k' if p['dataset'] == 'mnist5k' else p['dataset']} scale",
        "",
        f"Written by `{invocation}` on {datetime.now():%Y-%m-%d %H:%M} (commit {_git_commit()}, preset "
        f"`{p['name']}`). Every number below comes from the pipeline's stages under `{work}/`; "
        "nothing was tuned after seeing results: the settings, grids and sample counts are fixed in "
        f"`{rel(stages.__file__)}`.",
        "",
    ]
    if record["pending"]:
        steps = [f"{n} at step {s or 0:,} of {p['steps']:,}" for n, s in record.get("progress", {}).items()]
        lines += [f"**Partial report**: stages not finished yet: {', '.join(record['pending'])}.", ""]
        lines += [f"Trainings in progress: {'; '.join(steps)}.", ""] if steps else []
    noise, at = FID_NOISE["fid"], FID_NOISE["samples"]
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
        f"heatmap cell; the sweep screens on {p['sweep_samples']:,} and re-scores its Pareto set on "
        f"{p['sweep_final_samples']:,}.",
        "- Verdicts: two settings scored in one evaluation (the guidance table, one heatmap, the sweep's "
        "re-scored finalists) differ when the 95% *paired* bootstrap interval of their FID difference (the same "
        "resampled sample indices for both, `sgexp.eval.bootstrap`) excludes 0. Rows of different models or "
        f"evaluations fall back to a noise rule fixed in advance: ±{noise:g} FID at {at:,} samples (DESIGN.md's "
        f"seed-to-seed spread), scaled by √({at}/n).",
        "- GFLOPs are the analytic count of `sgexp.flops` (multiply-accumulates of the linear layers, the paper's "
        "convention), per generated sample over all sampling steps, for what runs: SG's two branches share their "
        f"dense prefix ({_shared_prefix(record)} here), which is counted once (the paper counts every pass in full).",
        "",
    ]
    return lines


def tread_vs_dense(record: dict, figures: dict) -> list[str]:
    p, final, train = record["preset"], record["final"], record["training"]
    lines = ["## 1. TREAD vs dense training at the same number of steps", ""]
    rows = []
    for model in ("tread", "dense"):
        r, t = final.get(model), train.get(model)
        scores = [_f(r["fid"]), *(_f(r[k], "{:.3f}") for k in ("class_accuracy", "precision", "recall"))] if r else []
        costs = [_f(t["train_gflops_per_image"], "{:.4f}"), _f(t["seconds"] / 60, "{:.1f}")] if t else ["-", "-"]
        name = "TREAD" if model == "tread" else "dense"
        rows.append([name, _f(t["steps"], "{:,}") if t else MISSING, *(scores or [MISSING, "-", "-", "-"]), *costs])
    header = ["training", "steps", f"unguided FID ({p['curve_samples']:,})", "class acc.", "precision", "recall"]
    header += ["fwd GFLOPs / train image", "train stage wall min"]
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
        by = {m: {pt["step"]: pt for pt in pts} for m, pts in record["curve"].items()}
        steps = sorted({s for points in by.values() for s in points})
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
    formats = {"fid": "{:.1f}", "precision": "{:.3f}", "recall": "{:.3f}", "class_accuracy": "{:.3f}"}
    formats |= {"gflops_per_sample": "{:.3f}", "relative_to_cfg": "{:.2f}", "seconds_per_sample": "{:.3f}"}
    lines += _table(header, [[setting(r), *(_f(r[k], fmt) for k, fmt in formats.items())] for r in rows])
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
        paper = PAPER["figure6_scales"]
        lines += [
            f"SG (Eq. 7, both branches conditional) on the TREAD model, {p['heatmap_samples']} samples per cell. "
            "Cells with γ_strong ≥ γ_weak are empty: constant SG needs γ_s < γ_w. The paper's Figure 6 shows the "
            f"same map on ImageNet for w ∈ {{{paper[0]:g}, …, {paper[-1]:g}}}; on this model SG needs a larger w "
            f"(DESIGN.md), so the two maps use w ∈ {{{', '.join(f'{s:g}' for s in p['heatmap_scales'])}}}.",
            "",
        ]
        if figures.get("heatmap"):
            lines += ["![FID heatmaps](results_heatmap.png)", ""]
        gammas = p["heatmap_gammas"]
        for scale, rows in sorted(record["heatmaps"].items(), key=lambda kv: float(kv[0])):
            cell = {(r["gamma_strong"], r["gamma_weak"]): r["fid"] for r in rows}
            table = [[f"γ_s={s:g}", *(_f(cell.get((s, w))) for w in gammas)] for s in gammas[:-1]]
            lines += [f"w = {float(scale):g}:", ""] + _table(["", *(f"γ_w={w:g}" for w in gammas)], table) + [""]
    lines += [f"### Pareto front of the `{STUDY}` study", ""]
    sweep = record.get("sweep")
    if not sweep:
        return lines + [MISSING, ""]
    s, study = sweep["summary"], yaml.safe_load((ROOT / "sweeps" / f"{STUDY}.yaml").read_text())
    baselines = [setting(_as_row(b)) for b in study["baselines"]]
    lines += [
        f"`{STUDY}` ({study['description']}; {study['optuna']['sampler'].upper()}) with {s['n_trials']} trials, "
        f"its {len(baselines)} baselines ({'; '.join(baselines)}) included; trials screened on {p['sweep_samples']} "
        f"samples, the Pareto set re-scored on {p['sweep_final_samples']}.",
        "",
    ]
    if figures.get("pareto"):
        lines += ["![Pareto front](results_pareto.png)", ""]
    header = ["trial", "setting", f"screening FID ({p['sweep_samples']})", f"final FID ({p['sweep_final_samples']})"]
    header += ["GFLOPs/sample"]
    table = []
    for r in s["pareto"]:
        scores = [_f(r["fid"]), _f(r["fid_final"]), _f(r["gflops_per_sample"], "{:.3f}")]
        table.append([str(r["number"]), setting(_as_row({**r, "rule": r["family"]})), *scores])
    return lines + _table(header, table) + [""]


def _as_row(s: dict) -> dict:
    """A guidance setting (a study's baseline, a trial) with numbers where ``setting`` reads them."""
    number = {k: float(s.get(k) or 0.0) for k in ("gamma_strong", "gamma_weak")}
    return {**s, **number, "scale": float(s.get("scale") or 1.0)}


def commands(record: dict, work: str) -> list[str]:
    name = record["preset"]["name"]
    lines = [
        "## Regenerate",
        "",
        "```bash",
        "make reproduce                                   # the whole pipeline; re-run to resume after an interruption",
        "make reproduce ARGS=--report-only                # rewrite this page from the finished stages",
        "make reproduce PRESET=smoke                      # the same pipeline in ~1 minute (digits, tiny model)",
        "```",
        "",
        f"`make reproduce PRESET={name}` runs `{invocation_of(['--preset', name])}`. Each stage runs one of the "
        "commands below in its own process with `OMP_NUM_THREADS=1` (two at a time), writes its log to "
        f"`{work}/logs/<stage>.log` and a marker to `{work}/stages/<stage>.json` when it finishes; finished stages "
        "are skipped and an interrupted training resumes from its `last.ckpt` (the command then ends with "
        "`resume=...`).",
        "",
        "<details><summary>The commands of every stage</summary>",
        "",
        "```bash",
    ]
    for stage, command in record["commands"].items():
        lines += [f"# {stage}", command]
    return lines + ["```", "", "</details>", ""]


def write(record: dict, figures: dict, path: Path, invocation: str, work: Path) -> Path:
    where = rel(work)
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
    """The command line that wrote the report, with paths inside the repository made relative."""
    return shlex.join([interpreter(), "-m", "reproduce", *(rel(a) if os.path.isabs(a) else a for a in argv)])
