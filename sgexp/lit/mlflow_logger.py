"""The Lightning side of MLflow tracking: a logger bound to the run ``sgexp.tracking.open_run`` made."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient

from sgexp.tracking import artifact_root_for, check_tracking_uri, flatten_params, log_params, open_run


class SgexpMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` bound to a run made by ``open_run``.

    Unlike the stock logger it never calls ``mlflow.set_tracking_uri`` (process-wide state that also
    sets ``MLFLOW_TRACKING_URI`` for every later client and subprocess), never creates a run, and logs
    hyper-parameters idempotently (a resumed run with a changed value gets a tag instead of a crash).
    """

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
        log_params(self.experiment, self.run_id, flatten_params(params, sep="/"))

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Ends the run even if nothing was logged (``open_run`` set it RUNNING)."""
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
) -> SgexpMLFlowLogger:
    """A Lightning ``MLFlowLogger`` for the run of ``run_dir`` (see ``open_run``).

    Checks the URI on every rank (fails fast if a server is down); only global rank zero opens the
    run, other ranks get a logger that Lightning keeps silent. ``log_model`` is Lightning's.
    """
    check_tracking_uri(tracking_uri)
    run_id = None
    if rank_zero_only.rank == 0:
        run_id = open_run(run_dir, tracking_uri, experiment, run_name, artifact_root, tags)
    return SgexpMLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        log_model=log_model,
        artifact_location=artifact_root_for(tracking_uri, artifact_root),
        run_id=run_id,
    )
