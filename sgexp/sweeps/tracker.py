"""Where a study records in MLflow: ``Tracker``, the study's parent run and one child run per trial.

The parent run is created once; its id lives in the study attribute ``mlflow_parent_run_id``, so every
worker and every resume reuses it. Each trial gets a nested child run (tag ``mlflow.parentRunId``;
params = the setting; metrics; the sample grid). Tracking errors in child runs are logged and do not fail
a trial: a lost log line is cheaper than a lost evaluation. (What a worker loads once, the model,
extractor and reference statistics, is ``sgexp.eval.evaluator.Evaluator``.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from omegaconf import DictConfig, OmegaConf

from sgexp import run_record, tracking

log = logging.getLogger("sgexp.sweeps.tracker")


class Tracker:
    """The MLflow parent run of a study and its child runs; see the module docstring."""

    def __init__(self, tracking_uri: str, parent_run_id: str, study_name: str):
        self.uri, self.parent, self.study_name = tracking_uri, parent_run_id, study_name
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
            info = self.client.get_run(parent_run_id).info
        except Exception as err:
            raise RuntimeError(
                f"the study's MLflow parent run {parent_run_id} is not in {tracking_uri} ({type(err).__name__}): "
                "pass the tracking URI the study was started with (--tracking-uri)"
            ) from None
        self.experiment_id = info.experiment_id

    @classmethod
    def open_parent(cls, study: optuna.Study, cfg: DictConfig, tracking_uri: str, extra: dict) -> Tracker:
        """The study's parent run, created the first time; logs the config (+ ``extra``) idempotently."""
        client = MlflowClient(tracking_uri=tracking_uri)
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id is None:
            location = tracking.artifact_root_for(tracking_uri, None)
            experiment = tracking.ensure_experiment(client, cfg.logger.experiment, location, tracking_uri)
            tags = {"sgexp.kind": "sweep", "sgexp.study": study.study_name, "sgexp.checkpoint": extra["checkpoint"]}
            run_id = client.create_run(experiment, run_name=study.study_name, tags=resolve_tags(tags)).info.run_id
            study.set_user_attr("mlflow_parent_run_id", run_id)
        tracker = cls(tracking_uri, run_id, study.study_name)
        client.update_run(run_id, status="RUNNING")
        config = {**OmegaConf.to_container(cfg, resolve=True), "sweep": extra}
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
            return run.info.run_id
        except Exception as err:
            log.warning("MLflow child run of trial %d not created: %s", number, err)
            return None

    def log_metrics(self, run_id: str | None, metrics: dict) -> None:
        if run_id is None:
            return
        now = int(time.time() * 1000)
        numbers = [
            Metric(key, float(value), now, 0)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        try:
            self.client.log_batch(run_id, metrics=numbers)  # one round trip: sqlite writers queue for a lock
        except Exception as err:
            log.warning("MLflow metrics of run %s not logged: %s", run_id, err)

    def end_child(
        self, run_id: str | None, status: str, reason: str | None, metrics: dict | None = None, grid: str | None = None
    ) -> None:
        """Log the trial's metrics and grid, then end its run as FINISHED or FAILED (with ``fail_reason``)."""
        if run_id is None:
            return
        self.log_metrics(run_id, metrics or {})
        try:
            if grid:
                self.client.log_artifact(run_id, grid, "samples")
            if reason:
                self.client.set_tag(run_id, "fail_reason", reason[:5000])
            self.client.set_terminated(run_id, status)
        except Exception as err:
            log.warning("MLflow child run %s not ended: %s", run_id, err)

    def end_parent(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent, status)
