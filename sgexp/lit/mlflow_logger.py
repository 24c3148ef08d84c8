"""The Lightning side of MLflow tracking: a logger bound to the run ``sgexp.tracking.open_run`` made,
with MLflow's system metrics (CPU, memory, disk, network and, with nvidia-ml-py, GPU) for the run."""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient

from sgexp.tracking import artifact_root_for, check_tracking_uri, flatten_params, log_params, open_run

log = logging.getLogger("sgexp.lit.mlflow_logger")

# Module hyper-parameters that the resolved config already records under another key (seed, model.*,
# optim.* have the same keys): logged once, under the config's key.
HPARAM_ALIASES = {"dataset": "data.name"}
SYSTEM_METRICS_INTERVAL = 10.0  # seconds; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it (tests: 0.5)


class SgexpMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` bound to a run made by ``open_run``.

    Unlike the stock logger it never calls ``mlflow.set_tracking_uri`` (process-wide state that also
    sets ``MLFLOW_TRACKING_URI`` for every later client and subprocess), never creates a run, and logs
    hyper-parameters once and idempotently: with the config's dotted keys, so the module's ``optim.lr``
    is the config's ``optim.lr`` (not a second ``optim/lr``), only keys the run lacks are added (the
    network's resolved ``model.depth``...), and a resumed run with a changed value gets a tag instead of a
    crash (``sgexp.tracking.log_params``).
    """

    _system_monitor = None

    @property
    @rank_zero_experiment
    def experiment(self) -> MlflowClient:
        if not self._initialized:
            if self._run_id is None:
                raise RuntimeError(
                    "SgexpMLFlowLogger needs a run id: build it with sgexp.lit.mlflow_logger.make_logger"
                )
            self._experiment_id = self._mlflow_client.get_run(self._run_id).info.experiment_id
            self._initialized = True
        return self._mlflow_client

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        params = vars(params) if isinstance(params, Namespace) else params
        flat = flatten_params(params)
        log_params(self.experiment, self.run_id, {HPARAM_ALIASES.get(k, k): v for k, v in flat.items()})

    def start_system_metrics(self, interval: float = SYSTEM_METRICS_INTERVAL) -> bool:
        """Record MLflow's system metrics (``system/cpu_utilization_percentage``,
        ``system/system_memory_usage_megabytes``, ``system/gpu_0_utilization_percentage`` with nvidia-ml-py,
        ...) every ``interval`` seconds until ``finalize``; a resumed run continues their steps. Needs psutil;
        without it, a warning and False. Call on global rank zero (``make_logger`` does)."""
        if self._run_id is None or self._system_monitor is not None:
            return self._system_monitor is not None
        try:
            import psutil  # noqa: F401  (MLflow's CPU monitor needs it; its import error would come later)
        except ImportError:
            log.warning("no system metrics for run %s: psutil is not installed", self._run_id)
            return False
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._system_monitor = SystemMetricsMonitor(
            self._run_id, sampling_interval=interval, resume_logging=True, tracking_uri=self._tracking_uri
        )
        self._system_monitor.start()
        return True

    def __getstate__(self) -> dict:
        """A copy (pickled for spawned processes) does not take the monitor's thread along."""
        return {**super().__getstate__(), "_system_monitor": None}

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Stops the system metrics (their last values are flushed while the run still runs), then ends the
        run even if nothing was logged (``open_run`` set it RUNNING)."""
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        if self._run_id is not None:
            _ = self.experiment
        super().finalize(status)


def make_logger(
    run_dir: Path,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    artifact_root: str | None = None,
    log_model: Literal[True, False, "all"] = False,
    tags: dict[str, Any] | None = None,
    system_metrics: bool = True,
) -> SgexpMLFlowLogger:
    """A Lightning ``MLFlowLogger`` for the run of ``run_dir`` (see ``open_run``).

    Checks the URI on every rank (fails fast if a server is down); only global rank zero opens the
    run, and there ``system_metrics`` (``logger.system_metrics``) starts MLflow's system metrics monitor;
    other ranks get a logger that Lightning keeps silent. ``log_model`` is Lightning's.
    """
    check_tracking_uri(tracking_uri)
    run_id = None
    if rank_zero_only.rank == 0:
        run_id = open_run(run_dir, tracking_uri, experiment, run_name, artifact_root, tags)
    logger = SgexpMLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        log_model=log_model,
        artifact_location=artifact_root_for(tracking_uri, artifact_root),
        run_id=run_id,
    )
    if run_id is not None and system_metrics:
        logger.start_system_metrics()
    return logger
