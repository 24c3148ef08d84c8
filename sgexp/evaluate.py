"""Score a checkpoint under several guidance settings: quality, GFLOPs and time per sample.

    python -m sgexp.evaluate                                   # latest run, guidance=[none,cfg,sg,cfg_sg]
    python -m sgexp.evaluate checkpoint=runs/mnist_tread/20261127-101500 num_samples=2000
    python -m sgexp.evaluate guidance=[cfg,sg,sg_cosine] guidance.sg.scale=8
    python -m sgexp.evaluate guidance=[ag_sg] weak_checkpoint=runs/.../checkpoints/step-0001000.ckpt
    python -m sgexp.evaluate select=best_w w_grid=[1.5,2,3,4] select_samples=1000 num_samples=10000
    torchrun --standalone --nproc_per_node 8 -m sgexp.evaluate num_samples=50000 ...

Every setting is scored on the same sample indices (same noise, labels and routing
seeds), so differences between rows are differences between settings. Each FID (and
sFID, precision) gets a bootstrap interval over the sample indices (``bootstrap`` redraws,
``ci_level``), and each pair of settings a *paired* interval of its FID (and sFID) difference
(``sgexp.eval.bootstrap``): a pair whose interval excludes 0 differs beyond the noise of
the sample draw. Prints the tables, writes ``results.json`` (rows with ``fid_ci``, and
``paired``) and sample grids, and logs an MLflow run nested under the training run.
``run(cfg)`` is what tests call through the compose API.

``select=best_w`` first picks each scaled setting's w from ``w_grid`` on ``select_samples``
samples of their own seed (``sgexp.eval.selection``; ``selection.json`` records it as it goes),
then scores the picks on ``num_samples``; rows say which w was picked from what grid.

Under torchrun (``WORLD_SIZE`` > 1) this module joins the process group itself (gloo on CPU,
nccl on CUDA, one GPU per ``LOCAL_RANK``): each rank samples its share of the indices, the
features are gathered, and rank 0 alone writes results, prints and logs to MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from sgexp import run_record, runs, tracking
from sgexp.checks import check_positive_int, fail
from sgexp.config import register_configs
from sgexp.eval.bootstrap import check_level, compare_settings, sign
from sgexp.eval.evaluator import Evaluator, load_evaluator
from sgexp.eval.selection import check_selection, describe, select_best_w
from sgexp.eval.settings import make_settings

log = logging.getLogger("sgexp.evaluate")
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
COLUMNS = [
    ("setting", "{}"),
    ("scale", "{:g}"),
    ("strong", "{}"),
    ("weak", "{}"),
    ("fid", "{:.2f}"),
    ("sfid", "{:.2f}"),
    ("precision", "{:.3f}"),
    ("recall", "{:.3f}"),
    ("inception_score", "{:.2f}"),
    ("class_accuracy", "{:.3f}"),
    ("gflops_per_sample", "{:.4g}"),
    ("relative_to_cfg", "{:.3f}"),
    ("seconds_per_sample", "{:.4f}"),
]
OPTIONAL = ("sfid", "inception_score")  # columns shown only when some row has them
HEADERS = {"sfid": "sFID", "inception_score": "IS"}  # short: the table must fit a 180-column log
VERDICTS = {-1: "a lower", 1: "b lower", 0: "inconclusive"}


def run(cfg: DictConfig) -> dict:
    root = Path(cfg.paths.root).resolve()
    cfg.paths.root = str(root)
    check_positive_int("num_samples", cfg.num_samples)
    check_positive_int("batch_size", cfg.batch_size)
    if isinstance(cfg.bootstrap, bool) or not isinstance(cfg.bootstrap, int) or cfg.bootstrap < 0:
        raise fail("bootstrap", cfg.bootstrap, "must be an integer >= 0 (redraws of the sample indices; 0: none)")
    check_level(cfg.ci_level, "ci_level")
    specs = OmegaConf.to_container(cfg.guidance, resolve=True)
    settings = make_settings(specs)
    if not settings:
        raise ValueError("guidance={} is invalid: select at least one setting, e.g. guidance=[none,cfg,sg]")
    grid = check_selection(cfg.select, list(cfg.w_grid), cfg.select_samples, specs)
    needs_weak = [s.name for s in settings if "weak" in s.rule.models]
    if needs_weak and not cfg.weak_checkpoint:
        raise ValueError(
            f"weak_checkpoint=None is invalid: settings {needs_weak} (AutoGuidance) need a weak checkpoint"
        )
    tracking_uri = tracking.tracking_uri_for(cfg.logger, root)
    own_group = _join_process_group(cfg.device)
    try:
        return _evaluate(cfg, specs, settings, grid, tracking_uri, root)
    finally:
        if own_group:
            dist.destroy_process_group()


def _evaluate(cfg: DictConfig, specs: dict, settings: list, grid: list[float], tracking_uri, root: Path) -> dict:
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Models, features and reference statistics before any sampling: a missing classifier
    # or Inception weights file fails now, not after an hour of sampling.
    with _rank_zero_first():  # missing reference statistics are computed (and cached) once, by rank 0
        evaluator = load_evaluator(cfg, tracking_uri)
    ckpt = evaluator.checkpoint
    run_dir = runs.run_dir_of(ckpt)
    default_dir = run_dir / "eval" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = _from_rank_zero(Path(cfg.out_dir) if cfg.out_dir else default_dir)  # one timestamp for all ranks
    out_dir.mkdir(parents=True, exist_ok=True)

    selection = None
    if grid:
        specs, selection = _select_best_w(cfg, evaluator, specs, grid, out_dir, rank)
        with warnings.catch_warnings():  # a rule's warning was shown when the settings were first built
            warnings.simplefilter("ignore")
            settings = make_settings(specs)
    rows, features = [], {}
    for setting in settings:  # each pass shows its own progress (sgexp.progress)
        row, features[setting.name] = evaluator.score_with_features(
            setting.name,
            setting,
            cfg.num_samples,
            cfg.seed,
            out_dir / f"{setting.name}.png" if rank == 0 else None,
            cfg.grid_size,
            labels=cfg.labels,
            npz=out_dir / f"{setting.name}.npz" if cfg.save_npz else None,
        )
        if selection and setting.name in selection["settings"]:
            row["w_selected_from"] = selection["grid"]
            row["w_selection"] = {k: selection[k] for k in ("samples", "seed")} | selection["settings"][setting.name]
        rows.append(row)
    paired = []
    if cfg.bootstrap and rank == 0:  # every setting on the same indices: one set of redraws serves all
        by_name = {row["setting"]: row for row in rows}
        cis, paired = compare_settings(
            features, by_name, evaluator.reference, cfg.bootstrap, cfg.ci_level, seed=cfg.seed
        )
        for row in rows:
            row.update(cis[row["setting"]])

    results = {
        "checkpoint": str(ckpt),
        "step": evaluator.step,
        "dataset": evaluator.dataset,
        "metric": evaluator.metric,
        "reference_split": cfg.reference_split,
        "reference": evaluator.reference_name,  # dataset/split, or the ADM reference batch file
        "num_samples": cfg.num_samples,
        "seed": cfg.seed,
        "ci": {"level": cfg.ci_level, "bootstrap": cfg.bootstrap},
        "rows": rows,
        "paired": paired,  # FID(a) - FID(b) (and sFID) with its paired interval, for every pair of settings
    }
    if selection:
        results["selection"] = selection  # how each w was picked (select=best_w)
    results["out_dir"] = str(out_dir)
    if rank != 0:  # rank 0 reports; the others return the same rows, without intervals
        return results
    (out_dir / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "out_dir"}, indent=2))
    _print_table(results)
    if tracking_uri:
        results["mlflow_run_id"] = _log_to_mlflow(cfg, results, out_dir, run_dir, tracking_uri, root)
    return results


def _select_best_w(cfg, evaluator: Evaluator, specs: dict, grid: list[float], out_dir: Path, rank: int):
    """``select=best_w``: the settings with their picked w, and the ``selection`` block of results.json.
    Every rank samples its share of each candidate; rank 0 computes the intervals, writes
    ``selection.json`` after every candidate and hands its pick to the others."""
    seed = cfg.seed + 1 if cfg.select_seed is None else cfg.select_seed
    header = {"method": "best_w", "samples": cfg.select_samples, "seed": seed}

    def score(setting):
        return evaluator.score_with_features(
            setting.name, setting, cfg.select_samples, seed, None, 0, labels=cfg.labels
        )

    def save(record: dict) -> None:
        _write_json(out_dir / "selection.json", header | record)

    chosen, record = select_best_w(
        specs,
        grid,
        score,
        evaluator.reference,
        cfg.bootstrap if rank == 0 else 0,
        cfg.ci_level,
        seed=seed,
        save=save if rank == 0 else None,
    )
    chosen, record = _from_rank_zero((chosen, record))
    for name, verdict in record["settings"].items() if rank == 0 else ():
        log.info("best w %s", describe(name, verdict))
    record.pop("rows")  # every candidate's row stays in selection.json
    return chosen, header | record


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a run killed mid-write leaves the previous version, not half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- torchrun


def _join_process_group(device: str) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1, its ``MASTER_ADDR``/``RANK`` in the environment) initialise
    the default process group, before anything is loaded: nccl with one GPU per ``LOCAL_RANK`` when
    the evaluation runs on CUDA, gloo on CPU. True if this call created it (``run`` destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if cuda and device in ("auto", "cuda"):  # "cuda" is then this rank's own GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


@contextmanager
def _rank_zero_first():
    """Rank 0 runs the block first, the other ranks after it (a no-op on one process)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank:
        dist.barrier()
    yield
    if rank == 0 and dist.is_initialized():
        dist.barrier()


def _from_rank_zero(value):
    """Rank 0's ``value`` on every rank (itself on one process)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- reports


def _print_table(results: dict) -> None:
    tables = [_selection_table(results["selection"])] if "selection" in results else []
    table = Table(
        title=f"{results['metric']} vs {results['reference']}, {results['num_samples']} samples, step {results['step']}"
    )
    if "selection" in results:  # which w was picked, from what grid
        grid = ", ".join(f"{w:g}" for w in results["selection"]["grid"])
        table.caption = f"scale (best): the lowest FID of w ∈ {{{grid}}} on {results['selection']['samples']} samples"
    rows = results["rows"]
    columns = [(k, f) for k, f in COLUMNS if k not in OPTIONAL or any(k in row for row in rows)]
    for key, _ in columns:
        name = HEADERS.get(key, key.replace("_", " "))
        table.add_column(name, justify="left" if key in ("setting", "strong", "weak") else "right")
    for row in rows:
        table.add_row(*(_cell(row, key, fmt) for key, fmt in columns))
    tables.append(table)
    if results["paired"]:
        level = f"{100 * results['ci']['level']:g}%"
        pairs = Table(title=f"paired differences, same {results['num_samples']} sample indices ({level} intervals)")
        for name in ("a", "b", "metric", "a - b", f"{level} interval", "verdict"):
            pairs.add_column(name, justify="left" if name in ("a", "b", "metric", "verdict") else "right")
        for p in results["paired"]:
            ci = "[{:+.2f}, {:+.2f}]".format(*p["ci"])
            pairs.add_row(p["a"], p["b"], p["metric"], f"{p['diff']:+.2f}", ci, VERDICTS[sign(p["ci"])])
        tables.append(pairs)
    # Logs and CI capture stdout: there rich's 80-column default would wrap every interval; the
    # tables get their own width instead (a terminal wraps to its width).
    width = None if sys.stdout.isatty() else max(Console(width=1000).measure(t).maximum for t in tables)
    console = Console(width=width)
    for t in tables:
        console.print(t)


def _selection_table(selection: dict) -> Table:
    """Each scaled setting's FID per w on the selection sample, and FID(w) − FID(picked) with its interval."""
    level = f"{100 * selection['ci_level']:g}%"
    table = Table(
        title=f"best w: FID on {selection['samples']} samples (seed {selection['seed']}), "
        f"w − picked with paired {level} intervals"
    )
    for name in ("setting", "w", "fid", "w − picked", "interval", "verdict"):
        table.add_column(name, justify="left" if name in ("setting", "verdict") else "right")
    for setting, verdict in selection["settings"].items():
        fids = {f["w"]: f["fid"] for f in verdict["fid"]}
        for p in verdict["paired"]:
            if p["w"] == verdict["picked"]:
                note = "picked" + ("" if verdict["decisive"] is not False else " (not decisive)")
            elif verdict["within_noise"] is None:
                note = "-"
            else:
                note = "within the noise" if p["w"] in verdict["within_noise"] else "worse"
            ci = "-" if p["ci"] is None else "[{:+.2f}, {:+.2f}]".format(*p["ci"])
            table.add_row(setting, f"{p['w']:g}", f"{fids[p['w']]:.2f}", f"{p['diff']:+.2f}", ci, note)
    return table


def _cell(row: dict, key: str, fmt: str) -> str:
    """A table cell; a metric with an interval prints as ``12.34 [11.02, 13.90]``, a picked w as ``1.5 (best)``."""
    if row.get(key) is None:
        return "-"
    text = fmt.format(row[key])
    if key == "scale" and "w_selected_from" in row:
        text += " (best)"
    if f"{key}_ci" in row:
        text += " [{}, {}]".format(*(fmt.format(v) for v in row[f"{key}_ci"]))
    return text


def _log_to_mlflow(cfg, results: dict, out_dir: Path, run_dir: Path, tracking_uri: str, root: Path) -> str:
    """An evaluation run nested under the training run (same experiment, parentRunId tag)."""
    parent_file = run_dir / tracking.RUN_ID_FILE
    tags = {"sgexp.kind": "evaluation", "sgexp.checkpoint": results["checkpoint"]}
    if parent_file.is_file():
        tags["mlflow.parentRunId"] = parent_file.read_text().strip()
    run_id = tracking.open_run(out_dir, tracking_uri, cfg.logger.experiment, f"eval/{out_dir.name}", tags=tags)
    client = MlflowClient(tracking_uri)
    run_record.log_run_context(
        client, run_id, config=OmegaConf.to_container(cfg, resolve=True), meta=None, checkpoint_dir=None, root=root
    )
    # The vocabulary of the training callback and of sweep trials (eval/<setting>/<metric>, sgexp.run_record),
    # so one MLflow chart compares all three kinds of run; batched, at the checkpoint's training step.
    step, values = max(results["step"], 0), {}
    for row in results["rows"]:
        values.update(run_record.eval_metrics(row["setting"], row))
        if "grid" in row:  # an MLflow image at the step, beside the training's grids of the same key
            run_record.log_image(
                client, row["grid"], run_record.eval_key(row["setting"], "samples"), step=step, run_id=run_id
            )
    for p in results["paired"]:
        values.update(run_record.paired_metrics(p))
    run_record.log_metrics(client, values, step, run_id=run_id)
    client.log_artifact(run_id, str(out_dir / "results.json"))
    if (out_dir / "selection.json").is_file():
        client.log_artifact(run_id, str(out_dir / "selection.json"))
    client.set_terminated(run_id)
    return run_id


def main() -> None:
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
