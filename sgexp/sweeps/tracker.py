"""Where a study records in MLflow: ``Tracker``, the study's parent run and one child run per trial.

The parent run is created once; its id lives in the study attribute ``mlflow_parent_run_id``, so every
worker and every resume reuses it. It is named ``sweep <study> @ <storage>`` (``parent_run_name``: the
journal's folder and file, or the database, and a short hash of the full storage URL), so two sweeps of
one study on different storages are told apart in the runs table; the full URL is the tag ``sgexp.storage``.

A killed sweep cannot end its parent run. Each command that opens a parent tags it with its host and process
(``sgexp.driver``); the next command on the same study name in the same experiment ends every other RUNNING
parent of that study whose driver process is gone from this host as KILLED (``close_dead_parents``), and
reuses its own (a resume sets it RUNNING, the end FINISHED). A parent whose driver ran on another host, or
that waits for a SLURM array (``sgexp.driver = slurm-array:<job>``), is left as it is: nothing here can tell
whether it still runs. Each trial gets a nested child run (tag ``mlflow.parentRunId``;
params = the setting; metrics; the sample grid). A trial's metrics use ``sgexp.evaluate``'s keys with the
trial's family as the setting (``eval/sg/fid``, ``eval/cfg/gflops_per_sample``, re-scored finalists
``eval/sg/fid_final``; ``sgexp.run_record.eval_metrics``), at the checkpoint's training step (parent tag
``sgexp.checkpoint_step``), so a CFG baseline trial, ``sgexp.evaluate guidance=[cfg]`` and the training's
evaluation of ``cfg`` share one chart. Tracking errors in child runs are logged and do not fail
a trial: a lost log line is cheaper than a lost evaluation. (What a worker loads once, the model,
extractor and reference statistics, is ``sgexp.eval.evaluator.Evaluator``.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from pathlib import Path

import optuna
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from omegaconf import DictConfig, OmegaConf

from sgexp import run_record, runs, tracking
from sgexp.sweeps.storage import shown_url

log = logging.getLogger("sgexp.sweeps.tracker")


class Tracker:
    """The MLflow parent run of a study and its child runs; see the module docstring."""

    def __init__(self, tracking_uri: str, parent_run_id: str, study_name: str):
        self.uri, self.parent, self.study_name = tracking_uri, parent_run_id, study_name
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            parent = self.client.get_run(parent_run_id)
        except Exception as err:
            raise RuntimeError(
                f"the study's MLflow parent run {parent_run_id} is not in {tracking_uri} ({type(err).__name__}): "
                "pass the tracking URI the study was started with (--tracking-uri)"
            ) from None
        self.experiment_id = parent.info.experiment_id
        self.step = int(parent.data.tags.get(STEP_TAG, 0))  # the checkpoint's training step
        self._settings: dict[str, str] = {}  # child run id -> its setting name (the trial's family)

    @classmethod
    def open_parent(cls, study: optuna.Study, cfg: DictConfig, tracking_uri: str, extra: dict) -> Tracker:
        """The study's parent run, created the first time; logs the config (+ ``extra``) idempotently.

        ``extra["storage"]`` names the run (``parent_run_name``); the training step of ``extra["checkpoint"]``
        is the step of the trials' metrics; parents of this study left RUNNING by killed commands are closed
        (``close_dead_parents``)."""
        client = MlflowClient(tracking_uri=tracking_uri)
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        storage = str(extra.get("storage", ""))
        name = parent_run_name(study.study_name, storage)
        if run_id is None:
            location = tracking.artifact_root_for(tracking_uri, None)
            experiment = tracking.ensure_experiment(client, cfg.logger.experiment, location, tracking_uri)
            tags = {"sgexp.kind": "sweep", "sgexp.study": study.study_name, "sgexp.checkpoint": extra["checkpoint"]}
            run_id = client.create_run(experiment, run_name=name, tags=resolve_tags(tags)).info.run_id
            study.set_user_attr("mlflow_parent_run_id", run_id)
        try:  # before the Tracker reads it; cheap (tensors are mapped, not read)
            client.set_tag(run_id, STEP_TAG, str(runs.checkpoint_step(extra["checkpoint"])))
        except runs.CheckpointError as err:
            log.warning("trial metrics at step 0: %s", err)
        tracker = cls(tracking_uri, run_id, study.study_name)
        close_dead_parents(client, tracker.experiment_id, study.study_name, keep=run_id)
        client.update_run(run_id, status="RUNNING", name=name)  # a parent made before runs were named so
        client.set_tag(run_id, "sgexp.storage", shown_url(storage))
        tracker.set_driver(f"{socket.gethostname()}:{os.getpid()}")
        config = {**OmegaConf.to_container(cfg, resolve=True), "sweep": {**extra, "storage": shown_url(storage)}}
        run_record.log_run_context(client, run_id, config=config, root=Path(cfg.paths.root))
        return tracker

    def start_child(self, number: int, family: str, setting: dict, extra_tags: dict | None = None) -> str | None:
        """A child run for trial ``number`` with the setting as params (``extra_tags``: e.g. the retry count);
        None if MLflow refused."""
        try:
            tags = {
                "mlflow.parentRunId": self.parent,
                "sgexp.kind": "sweep-trial",
                "sgexp.study": self.study_name,
                "sgexp.trial": str(number),
                "sgexp.family": str(family),
                **{k: str(v) for k, v in (extra_tags or {}).items()},
            }
            run = self.client.create_run(
                self.experiment_id, run_name=f"{self.study_name}/trial-{number:04d}", tags=tags
            )
            params = tracking.flatten_params({"trial": number, "family": family, **setting})
            self.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            self._settings[run.info.run_id] = str(family)
            return run.info.run_id
        except Exception as err:
            log.warning("MLflow child run of trial %d not created: %s", number, err)
            return None

    def setting_of(self, run_id: str) -> str:
        """The setting name of a child run's metrics: its trial's family (tag ``sgexp.family``)."""
        if run_id not in self._settings:  # a child another process started (workers, the final re-scoring)
            self._settings[run_id] = self.client.get_run(run_id).data.tags.get("sgexp.family", "trial")
        return self._settings[run_id]

    def log_metrics(self, run_id: str | None, metrics: dict) -> None:
        """``metrics`` (a trial's row: ``fid``, ``gflops_per_sample``, ...) as ``eval/<family>/<key>``, batched."""
        if run_id is None:
            return
        try:  # one round trip: sqlite writers queue for a lock
            run_record.log_metrics(
                self.client, run_record.eval_metrics(self.setting_of(run_id), metrics), self.step, run_id=run_id
            )
        except Exception as err:
            log.warning("MLflow metrics of run %s not logged: %s", run_id, err)

    def log_paired(self, paired: list[dict]) -> None:
        """Paired differences between finalists (``fidelity.pair_finalists``) on the parent run, as
        ``eval/paired/trial-<a>-trial-<b>/<metric>_diff|_ci_low|_ci_high``, batched."""
        values = {}
        for pair in paired:
            named = {**pair, "a": f"trial-{pair['a']}", "b": f"trial-{pair['b']}"}
            values.update(run_record.paired_metrics(named))
        try:
            run_record.log_metrics(self.client, values, self.step, run_id=self.parent)
        except Exception as err:
            log.warning("MLflow paired intervals of run %s not logged: %s", self.parent, err)

    def end_child(
        self, run_id: str | None, status: str, reason: str | None, metrics: dict | None = None, grid: str | None = None
    ) -> None:
        """Log the trial's metrics and grid (the image ``eval/<family>/samples``), then end its run as FINISHED
        or FAILED (with ``fail_reason``)."""
        if run_id is None:
            return
        self.log_metrics(run_id, metrics or {})
        try:
            if grid:
                key = run_record.eval_key(self.setting_of(run_id), "samples")
                run_record.log_image(self.client, grid, key, step=self.step, run_id=run_id)
            if reason:
                self.client.set_tag(run_id, "fail_reason", reason[:5000])
            self.client.set_terminated(run_id, status)
        except Exception as err:
            log.warning("MLflow child run %s not ended: %s", run_id, err)

    def end_parent(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)

    def set_driver(self, driver: str) -> None:
        """Who keeps the parent RUNNING: ``host:pid`` of a command, or ``slurm-array:<job id>``."""
        self.client.set_tag(self.parent, DRIVER_TAG, driver)


DRIVER_TAG = "sgexp.driver"
STEP_TAG = "sgexp.checkpoint_step"


def parent_run_name(study_name: str, storage: str) -> str:
    """``sweep <study> @ <where> (<hash>)``: ``<where>`` is a journal's folder/file or an RDB URL's
    database (with its host), ``<hash>`` the first 6 hex digits of SHA-1 of the full storage URL, which
    tells apart storages whose short forms agree (two ``runs/optuna/x.log`` of two checkouts)."""
    if not storage:
        return f"sweep {study_name}"
    if "://" in storage:
        from sqlalchemy.engine import make_url

        try:
            url = make_url(storage)
            host = f"{url.host}:{url.port}/" if url.host and url.port else (f"{url.host}/" if url.host else "")
            where = f"{url.get_backend_name()}:{host}{Path(url.database or '').name}"
        except Exception:  # not a URL sqlalchemy parses
            where = shown_url(storage)
    else:
        path = Path(storage).expanduser().resolve()
        where = f"{path.parent.name}/{path.name}"
    digest = hashlib.sha1(storage.encode()).hexdigest()[:6]
    return f"sweep {study_name} @ {where} ({digest})"


def _driver_gone(driver: str | None) -> bool:
    """True when ``host:pid`` names a process of this host that no longer exists."""
    host, _, pid = (driver or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host, a SLURM array, or a parent made before drivers were tagged
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def close_dead_parents(client: MlflowClient, experiment_id: str, study_name: str, keep: str) -> list[str]:
    """End as KILLED every RUNNING parent run of ``study_name`` (other than ``keep``) whose driver process
    is gone from this host; returns their run ids. ``keep``, if it was left RUNNING by a killed command,
    is reused (logged)."""
    if "'" in study_name:  # not expressible in MLflow's filter syntax; such a study keeps its old parents
        return []
    query = f"tags.`sgexp.kind` = 'sweep' and tags.`sgexp.study` = '{study_name}' and attributes.status = 'RUNNING'"
    closed = []
    for run in client.search_runs([experiment_id], query, max_results=1000):
        driver = run.data.tags.get(DRIVER_TAG)
        if not _driver_gone(driver):
            continue
        if run.info.run_id == keep:
            log.info("parent run %s was left RUNNING by a killed command (%s): reused", keep, driver)
            continue
        client.set_tag(
            run.info.run_id, "sgexp.closed_by", f"{socket.gethostname()}:{os.getpid()}: driver {driver} gone"
        )
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("parent run %s of study %s (driver %s gone) ended as KILLED", run.info.run_id, study_name, driver)
        closed.append(run.info.run_id)
    return closed
