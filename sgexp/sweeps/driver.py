"""Run an Optuna study of guidance settings on a trained checkpoint: storage, workers, heartbeat, fidelity.

Each trial scores one guidance setting with ``sgexp.eval.sampling.score_setting`` on sample indices
``0..samples_per_trial-1`` with the study's seed, so every trial sees the same noise, labels and routing
masks (common random numbers) and FID differences are differences between settings.
``trial.values = [FID, GFLOPs/sample]`` (screening fidelity), both minimised. When the budget is met the
Pareto set is re-scored with ``final_samples`` on indices ``0..final_samples-1`` (the screening samples
are its first ones).

Storage, heartbeat and budget: see ``sgexp.sweeps.storage``. Re-running a command resumes: the study is
loaded, no finished trial is redone and baselines are enqueued only the first time; a resume that changes
what the numbers depend on (checkpoint, space, samples, seed, ...; see ``study.check_resume``) is refused.

Workers: with one worker the driving process runs the trials itself; ``--workers K`` starts K spawned
processes on the same storage (each with ``cores // K`` torch threads) while the driver only watches.
Each loads the model, extractor and reference statistics once (``sgexp.eval.evaluator``), then loops
ask -> score -> tell until the budget is met. ``study.ask`` pops an enqueued trial for exactly one worker,
so none is evaluated twice.

The Pareto set's re-scoring and its in-memory view: ``sgexp.sweeps.fidelity``.

MLflow: one parent run per study (its id in the study attribute ``mlflow_parent_run_id``, shared by all
workers and resumes) and one nested child run per trial. The default sqlite store takes a few local
writers; clusters with many workers should use an MLflow server (``--tracking-uri http://...``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from omegaconf import DictConfig, OmegaConf
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from sgexp import tracking
from sgexp.checks import check_positive_int, fail
from sgexp.eval.evaluator import Evaluator, load_evaluator
from sgexp.sweeps.fidelity import METRICS, final_view, finalists, reevaluate_pareto
from sgexp.sweeps.progress import LiveProgress, label
from sgexp.sweeps.report import pareto_table, write_report
from sgexp.sweeps.space import SearchSpace, describe, enqueue_baselines, make_sampler, normalise_setting, process_seed
from sgexp.sweeps.storage import (
    INTERRUPTED,
    RETRIES,
    Heartbeat,
    counts,
    default_storage,
    open_storage,
    reap_stale,
    release,
    setup_lock,
    shown_url,
)
from sgexp.sweeps.study import check_resume, name_objectives
from sgexp.sweeps.tracker import Tracker

log = logging.getLogger("sgexp.sweeps.driver")

RECORDED = (*METRICS, "gflops_per_sample", "relative_to_cfg", "seconds_per_sample", "num_samples")


# --------------------------------------------------------------------------- trials


@dataclass
class Worker:
    """One worker's view of the study: what it needs to run trials."""

    cfg: DictConfig
    study: optuna.Study
    space: SearchSpace
    evaluator: Evaluator
    tracker: Tracker | None
    out_dir: Path
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # "worker" attr
    progress: LiveProgress | None = None  # the driver's view, when the driver runs the trials itself

    def loop(self) -> int:
        """ask -> score -> tell until ``n_trials`` trials are finished; returns how many this worker ran.

        Retries of trials whose worker died run even past the budget (they replace a lost trial), and a
        worker leaves only when no trial is running, so the last stale one is reaped and retried too."""
        cfg, ran = self.cfg, 0
        while True:
            for t, reason in reap_stale(self.study, cfg.heartbeat.timeout, cfg.optuna.max_retries):
                if self.tracker is not None:
                    self.tracker.end_child(t.user_attrs.get("mlflow_run_id"), "FAILED", reason)
            n = counts(self.study)
            if n["done"] >= cfg.n_trials and not n["retries_waiting"] and not n["running"]:
                return ran
            if n["done"] + n["running"] >= cfg.n_trials and not n["retries_waiting"]:
                time.sleep(cfg.heartbeat.interval)  # others are finishing (or died: reaped above, then retried)
                continue
            self.run_trial(self.study.ask())
            ran += 1
            if self.progress is not None:
                self.progress(self.study)

    def run_trial(self, trial: optuna.Trial) -> None:
        cfg, study = self.cfg, self.study
        try:
            with Heartbeat(study._storage, trial._trial_id, cfg.heartbeat.interval):
                values = self._evaluate(trial)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"[:2000]
            log.warning("trial %d failed: %s", trial.number, reason)
            if self.tracker is not None:
                self.tracker.end_child(trial.user_attrs.get("mlflow_run_id"), "FAILED", reason)
            try:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
            except (UpdateFinishedTrialError, ValueError):
                log.error("trial %d was already failed by another worker (stale heartbeat)", trial.number)
            return
        except BaseException:  # Ctrl-C, SystemExit: hand the trial back now instead of after the timeout
            release(study, study._storage.get_trial(trial._trial_id), INTERRUPTED)
            raise
        try:
            study.tell(trial, values)
        except (UpdateFinishedTrialError, ValueError):
            log.error(
                "trial %d finished after another worker had failed it as stale (heartbeat.timeout %g s too short?): "
                "its result is discarded and the retry evaluates it again",
                trial.number,
                cfg.heartbeat.timeout,
            )

    def _evaluate(self, trial: optuna.Trial) -> list[float]:
        cfg, enqueued = self.cfg, dict(trial.user_attrs)
        family, setting = self.space.suggest(trial) if enqueued.get("in_space", True) else (None, None)
        family = enqueued.get("family", family)
        setting = normalise_setting(enqueued.get("setting", setting))
        attrs = {"family": family, "baseline": bool(enqueued.get("baseline", False)), "setting": setting}
        retries = int(enqueued.get(RETRIES, 0))
        attrs.update(describe(setting), worker=self.name, seed=cfg.seed, retries=retries)
        attrs["sampler_seed"] = getattr(self.study.sampler, "seed", None)  # this process's, see space.process_seed
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.tracker is not None:
            run_id = self.tracker.start_child(trial.number, family, setting, {"sgexp.retries": retries})
            trial.set_user_attr("mlflow_run_id", run_id)
        _test_kill_hook(setting)
        grid = self.out_dir / "trials" / f"trial-{trial.number:04d}.png" if cfg.grid_size else None
        shown = contextlib.nullcontext()  # no view (a worker process): the pass shows its own, in the worker's log
        if self.progress is not None:
            shown = self.progress.track(self.study, f"trial {trial.number} {label(attrs)}", cfg.samples_per_trial)
        with shown as advance:
            row = self.evaluator.score(
                f"trial-{trial.number}", setting, cfg.samples_per_trial, cfg.seed, grid, cfg.grid_size, advance
            )
        if not math.isfinite(row.get("fid", math.nan)):
            raise FloatingPointError(f"non-finite FID {row.get('fid')!r} for {setting}")
        recorded = {k: int(row[k]) if k == "num_samples" else float(row[k]) for k in RECORDED if k in row}
        for key, value in {**recorded, "grid": row.get("grid")}.items():
            trial.set_user_attr(key, value)
        if self.tracker is not None:
            self.tracker.end_child(trial.user_attrs.get("mlflow_run_id"), "FINISHED", None, recorded, row.get("grid"))
        point = (attrs["scale"], attrs["gamma_strong"], attrs["gamma_weak"])
        line = "trial %d %s w=%.3g γs=%.3g γw=%.3g: FID %.2f, %.4g GFLOPs/sample"
        log.info(line, trial.number, family, *point, row["fid"], row["gflops_per_sample"])
        return [float(row[o]) for o in cfg.objectives]


def _test_kill_hook(setting: dict) -> None:
    """Test only (``tests/test_sweep_restart.py``): with ``SGEXP_TEST_KILL_SETTING`` set to a JSON mapping,
    a worker meeting a setting that contains it SIGKILLs itself, as the OOM killer would. Unset: nothing."""
    wanted = os.environ.get("SGEXP_TEST_KILL_SETTING")
    if wanted and all(setting.get(k) == v for k, v in json.loads(wanted).items()):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- a study, start to end


@dataclass
class Session:
    """Everything a study run holds: returned by ``start`` and consumed by ``finish``."""

    cfg: DictConfig
    study: optuna.Study
    storage_url: str
    tracking_uri: str | None
    tracker: Tracker | None
    evaluator: Evaluator | None
    out_dir: Path


def start(cfg: DictConfig, storage_url: str | None = None, tracking_uri: str | None = None) -> Session:
    """Check everything (storage, tracking, checkpoint, extractor), then create or resume the study."""
    cfg.paths.root = str(Path(cfg.paths.root).resolve())
    storage_url = storage_url or default_storage(cfg)
    storage = open_storage(storage_url)
    tracking_uri = tracking.tracking_uri_for(cfg.logger, Path(cfg.paths.root), tracking_uri)
    evaluator = load_evaluator(cfg, tracking_uri)
    space = SearchSpace(cfg)
    with setup_lock(storage_url):  # commands started together: one sets the study up, the others resume it
        study = optuna.create_study(
            storage=storage,
            study_name=cfg.name,
            directions=["minimize", "minimize"],
            sampler=make_sampler(cfg, process_seed(cfg.optuna.seed)),
            load_if_exists=True,
        )
        check_resume(study, cfg, evaluator.checkpoint)
        name_objectives(study, list(cfg.objectives))  # Optuna's plots and optuna-dashboard show these names
        attrs = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "checkpoint": str(evaluator.checkpoint),
            "metric": evaluator.metric,
            "samples_per_trial": cfg.samples_per_trial,
            "final_samples": cfg.final_samples,
            "storage": shown_url(storage_url),  # study attribute: never a password
            "tracking_uri": tracking_uri,
        }
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        tracker = None
        if tracking_uri:
            space_desc = {k: repr(d) for k, d in space.distributions().items()}
            extra = {"checkpoint": str(evaluator.checkpoint), "storage": storage_url, "search_space": space_desc}
            tracker = Tracker.open_parent(study, cfg, tracking_uri, extra)
        enqueue_baselines(study, cfg, space)
    out_dir = Path(cfg.paths.runs_dir).resolve() / "sweeps" / cfg.name
    return Session(cfg, study, storage_url, tracking_uri, tracker, evaluator, out_dir)


def run_study(
    cfg: DictConfig, storage_url: str | None = None, workers: int = 1, tracking_uri: str | None = None, progress=None
) -> dict:
    """Run (or resume) the study until its budget is met, re-score the Pareto set, write the report.

    ``progress`` (``sgexp.sweeps.progress.LiveProgress``) is called after each trial (one worker) or every
    second (several); with one worker it also shows each sampling pass batch by batch (``progress.track``).
    """
    check_positive_int("workers", workers)
    session = start(cfg, storage_url, tracking_uri)
    try:
        if workers == 1:
            s = session
            Worker(s.cfg, s.study, SearchSpace(s.cfg), s.evaluator, s.tracker, s.out_dir, progress=progress).loop()
        else:
            run_workers(session, workers, progress)
    except BaseException:  # Ctrl-C or a crash: the parent run says so (a resume sets it RUNNING again)
        if session.tracker is not None:
            session.tracker.end_parent("KILLED")
        raise
    n = counts(session.study)
    if n["done"] < cfg.n_trials:
        raise RuntimeError(
            f"study {cfg.name}: only {n['done']} of {cfg.n_trials} trials finished (workers died?): see "
            f"{session.out_dir / 'workers'}; re-run the same command to resume"
        )
    return finish(session, progress)


def run_workers(session: Session, workers: int, progress=None) -> None:
    """K spawned worker processes on the study's storage; the calling process only watches."""
    plain = OmegaConf.to_container(session.cfg, resolve=True)
    logs = session.out_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")  # fork would copy torch's threads and locks
    procs = [
        context.Process(
            target=worker_main,
            args=(plain, session.storage_url, session.tracking_uri, k, workers, os.getpid(), str(logs / f"{k}.log")),
            name=f"sgexp-sweep-worker-{k}",
        )
        for k in range(workers)
    ]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if progress is not None:
                progress(session.study)
            time.sleep(1.0)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for k, p in enumerate(procs):
        if p.exitcode != 0:
            log.error("worker %d exited with code %s: see %s", k, p.exitcode, logs / f"{k}.log")


def worker_main(
    plain_cfg: dict, storage_url: str, tracking_uri: str | None, k: int, workers: int, parent: int, log_file: str
) -> None:
    """Entry of a spawned worker: log to ``log_file``, load once, loop; exits if the driver dies."""
    # stdout and stderr too: a stray print or a progress bar on the driver's terminal would tear its live view,
    # and off a terminal each sampling pass writes lines (sgexp.progress) into this worker's log
    with open(log_file, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    logging.basicConfig(
        filename=log_file, level=logging.INFO, force=True, format=f"%(asctime)s worker {k} %(name)s: %(message)s"
    )
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # K workers share the cores
    work(OmegaConf.create(plain_cfg), storage_url, tracking_uri, k)


def work(cfg: DictConfig, storage_url: str, tracking_uri: str | None, k: int) -> int:
    """One worker on a study that ``start`` created: load the model once, loop ask -> score -> tell until the
    budget is met; returns the number of trials it ran. Local worker processes and SLURM array tasks."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evaluator = load_evaluator(cfg, tracking_uri)
    study = optuna.load_study(
        study_name=cfg.name,
        storage=open_storage(storage_url),
        sampler=make_sampler(cfg, process_seed(cfg.optuna.seed, k)),
    )
    parent_run = study.user_attrs.get("mlflow_parent_run_id")
    tracker = Tracker(tracking_uri, parent_run, cfg.name) if tracking_uri and parent_run else None
    out_dir = Path(cfg.paths.runs_dir) / "sweeps" / cfg.name
    ran = Worker(cfg, study, SearchSpace(cfg), evaluator, tracker, out_dir).loop()
    log.info("done: %d trials", ran)
    return ran


def _exit_with_parent(parent: int) -> None:
    """A SIGKILLed driver cannot stop its workers: they notice that they were re-parented and exit."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


def finish(session: Session, progress: LiveProgress | None = None) -> dict:
    """Re-score the Pareto set (if an evaluator is loaded; shown by ``progress``, if given), write the
    report, end the parent run."""
    study, cfg = session.study, session.cfg
    if session.evaluator is not None:
        reevaluate_pareto(study, cfg, session.evaluator, session.tracker, session.out_dir, progress)
    view = final_view(study)
    report_dir = session.out_dir / "report"
    parent = study.user_attrs.get("mlflow_parent_run_id")
    files = write_report(view, report_dir, session.tracking_uri if session.tracker else None, parent)
    if session.tracker is not None:
        session.tracker.end_parent()
    return {
        "study": study.study_name,
        "storage": shown_url(session.storage_url),
        "view": view,
        "pareto": pareto_table(view),
        "report": files,
        "report_dir": report_dir,
        "mlflow_parent_run_id": parent,
        "tracking_uri": session.tracking_uri,
        "mlflow_experiment_id": session.tracker.experiment_id if session.tracker else None,
        "counts": counts(study),
        "metric": study.user_attrs.get("metric"),
    }


def run_report(name: str, storage_url: str, tracking_uri: str | None = None, reevaluate: bool = True) -> dict:
    """Report of an existing study from its storage alone; re-scores missing finals if the checkpoint is here."""
    if "://" not in storage_url and not Path(storage_url).expanduser().is_file():
        raise fail("storage", storage_url, "no such journal file (pass the study's --storage)")
    storage = open_storage(storage_url)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise fail("study", name, f"is not in {storage_url}, which holds {names}") from None
    if "config" not in study.user_attrs:
        raise fail("study", name, "has no stored config: was it made by sgexp.sweeps?")
    cfg = OmegaConf.create(study.user_attrs["config"])
    tracking_uri = tracking_uri or study.user_attrs.get("tracking_uri")
    parent = study.user_attrs.get("mlflow_parent_run_id")
    tracker = None
    if tracking_uri and parent:
        try:
            tracker = Tracker(tracking_uri, parent, name)
        except RuntimeError as err:  # e.g. the study's sqlite store is on another machine
            log.warning("report not logged to MLflow: %s", err)
    evaluator = None
    missing = [t for t in finalists(study) if f"final/{t.number}" not in study.user_attrs]
    if reevaluate and cfg.final_samples and missing:
        try:
            evaluator = load_evaluator(cfg, tracking_uri)
        except (OSError, ValueError, RuntimeError) as err:
            log.warning("Pareto set not re-evaluated here (%s): the report has screening FIDs only", err)
    out_dir = Path(cfg.paths.runs_dir) / "sweeps" / name
    return finish(Session(cfg, study, storage_url, tracking_uri, tracker, evaluator, out_dir))
