"""Map the FID-versus-FLOPs trade-off of a guidance rule with an Optuna study on a trained checkpoint.

    python -m sgexp.sweeps --study sparsity_pareto                      # latest checkpoint, sweeps/sparsity_pareto.yaml
    python -m sgexp.sweeps --study cfg_scale --workers 2 --n-trials 20
    python -m sgexp.sweeps --study sparsity_pareto --set checkpoint=runs/mnist_tread/20261127-101500 --set seed=1
    python -m sgexp.sweeps --study sparsity_pareto --report              # report only, from the storage
    python -m sgexp.sweeps dashboard --study sparsity_pareto [--port 8080]  # optuna-dashboard on 127.0.0.1
    python -m sgexp.sweeps --study sparsity_pareto --slurm-array 8 --slurm-args="--partition=gpu --gpus=1" \\
        --tracking-uri http://login1:5000                                # 8 SLURM worker jobs, one journal

Re-running a command resumes its study (same storage: ``runs/optuna/<study>.log`` by default). Ends with
the Pareto table, the report directory and the MLflow parent run. See ``sgexp.sweeps.driver``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import optuna
from rich.console import Console
from rich.logging import RichHandler

from sgexp.sweeps.storage import shown_url
from sgexp.sweeps.study import available_studies, load_study


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sgexp.sweeps", description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, help=f"a file of sweeps/: {', '.join(available_studies())}")
    parser.add_argument("--storage", help="journal file or RDB URL (default runs/optuna/<study>.log)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes (%(default)s)")
    parser.add_argument("--n-trials", type=int, help="override n_trials (the budget, baselines included)")
    parser.add_argument("--samples", type=int, help="override samples_per_trial (screening)")
    parser.add_argument("--final-samples", type=int, help="override final_samples (Pareto re-evaluation; 0: none)")
    parser.add_argument("--report", action="store_true", help="only write the report of the stored study")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="Hydra override (repeatable)")
    slurm = parser.add_argument_group("SLURM (see sgexp.sweeps.array)")
    slurm.add_argument("--slurm-array", type=int, metavar="K", help="submit K worker jobs (a job array) and return")
    slurm.add_argument("--slurm-args", default="", help='more sbatch options: --slurm-args="--partition=gpu --time=60"')
    slurm.add_argument("--slurm-cpus", type=int, default=1, help="CPUs per worker job (%(default)s)")
    slurm.add_argument("--wait", action="store_true", help="with --slurm-array: wait for the workers, then report")
    slurm.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600, help="seconds (%(default)s)")
    slurm.add_argument("--slurm-worker", action="store_true", help=argparse.SUPPRESS)  # what each array task runs
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: logger.tracking_uri, else runs/mlflow.db)"
    )
    return parser.parse_args(argv)


def parse_dashboard(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sgexp.sweeps dashboard", description="Open a stored study in optuna-dashboard (127.0.0.1)."
    )
    parser.add_argument("--study", required=True, help="the study's name (--set name=... of the sweep)")
    parser.add_argument("--storage", help="journal file or RDB URL (default runs/optuna/<study>.log)")
    parser.add_argument("--port", type=int, default=8080, help="%(default)s")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="paths.root, paths.runs_dir")
    return parser.parse_args(argv)


def stored_storage(args: argparse.Namespace, name: str) -> str:
    """The storage of a stored study: --storage, else the sweep's default ``<runs_dir>/optuna/<name>.log``."""
    root = Path(_override(args.set, "paths.root") or ".")
    runs = Path(_override(args.set, "paths.runs_dir") or root / "runs")
    return args.storage or str(runs.resolve() / "optuna" / f"{name}.log")


def overrides(args: argparse.Namespace) -> list[str]:
    flags = {"n_trials": args.n_trials, "samples_per_trial": args.samples, "final_samples": args.final_samples}
    return [*args.set, *(f"{key}={value}" for key, value in flags.items() if value is not None)]


def _override(items: list[str], key: str) -> str | None:
    """The last ``key=value`` of the overrides, for --report (which reads no study file)."""
    values = [item.split("=", 1)[1] for item in items if item.split("=", 1)[0].lstrip("+") == key]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dashboard"]:
        from sgexp.sweeps import dashboard

        args = parse_dashboard(argv[1:])
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        dashboard.serve(args.study, stored_storage(args, args.study), args.port)
        return {}
    args = parse(argv)
    # After parsing, so that --help stays fast: these bring in MLflow and Lightning (seconds).
    from sgexp.sweeps import array, driver
    from sgexp.sweeps.progress import LiveProgress, print_summary

    if args.slurm_array is not None and args.slurm_array < 1:
        raise ValueError(f"--slurm-array={args.slurm_array} is invalid: the number of worker jobs, an integer >= 1")
    if args.slurm_array is not None and args.workers != 1:
        raise ValueError(f"--workers={args.workers} is invalid with --slurm-array: each array task is one worker")
    console = Console(stderr=True)
    handler = log_handler(console)
    logger = logging.getLogger("sgexp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        if args.report:
            name = _override(args.set, "name") or args.study
            summary = driver.run_report(name, stored_storage(args, name), args.tracking_uri)
        elif args.slurm_worker:
            return {"ran": array.run_worker(args.study, overrides(args), args.storage, args.tracking_uri)}
        elif args.slurm_array is not None:
            summary = submit_array(args, console)
            if summary is None:
                return {}
        else:
            cfg = load_study(args.study, overrides(args))
            with LiveProgress(console) as progress:
                summary = driver.run_study(cfg, args.storage, args.workers, args.tracking_uri, progress)
        print_summary(summary, Console(soft_wrap=True))  # paths and URLs on one line, also in a log file
        return summary
    finally:
        logger.removeHandler(handler)


def log_handler(console: Console) -> logging.Handler:
    """Rich's handler on a terminal; in a log file one plain line per record, as Rich would wrap a long
    progress line (``sgexp.sweeps.progress``) over several at its default width of 80 columns."""
    if console.is_terminal:
        return RichHandler(console=console, show_path=False)
    handler = logging.StreamHandler(console.file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    return handler


def submit_array(args: argparse.Namespace, console: Console) -> dict | None:
    """--slurm-array K: start the study here, submit the workers; with --wait, also finish and report."""
    from sgexp import slurm  # with the driver (see main): only a submission needs them
    from sgexp.sweeps import array, driver
    from sgexp.sweeps.progress import ArrayProgress

    slurm.require_sbatch()
    session = driver.start(load_study(args.study, overrides(args)), args.storage, args.tracking_uri)
    job_id, script = array.submit(
        session, args.study, overrides(args), args.slurm_array, args.slurm_cpus, args.slurm_args
    )
    if session.tracker is not None:  # the parent waits for the array, not for this command (tracker.py)
        session.tracker.set_driver(f"slurm-array:{job_id}")
    console.print(f"submitted SLURM array {job_id} ({args.slurm_array} workers): {script}")
    console.print(f"  storage {shown_url(session.storage_url)}    queue: squeue -j {job_id}")
    if not args.wait:
        report = f"python -m sgexp.sweeps --study {args.study} --storage {shown_url(session.storage_url)} --report"
        console.print(f"  report any time: {report}")
        return None
    slurm.wait(job_id, args.wait_timeout, on_poll=ArrayProgress(console, args.slurm_array, session.study))
    n = driver.counts(session.study)
    if n["done"] < session.cfg.n_trials:
        raise RuntimeError(
            f"SLURM array {job_id} ended with {n['done']} of {session.cfg.n_trials} trials: see "
            f"{script.parent}/{job_id}_*.out; resubmit the same command to finish the study"
        )
    return driver.finish(session)


def command_line() -> None:
    """``python -m sgexp.sweeps``: ``main`` with bad input reported as one line, not a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, TimeoutError) as err:  # bad input: the message says what to do
        sys.exit(f"error: {err}")
