"""MLflow conventions: where runs are stored and how a run keeps its identity.

- Store: always an explicit tracking URI. ``resolve_tracking_uri`` takes the configured value
  (``logger.tracking_uri``), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/runs/mlflow.db``
  with artifacts in ``<root>/runs/mlartifacts``. mlflow 3 refuses the ``file:`` store, so it is
  rejected here with a clear error instead of failing deep inside mlflow.
- Fail fast: ``check_tracking_uri`` asks an ``http(s)://`` server for ``/health`` once, with a short
  timeout, before any mlflow client call (mlflow itself retries HTTP for minutes).
- Identity: ``open_run`` keeps the run id in ``<run_dir>/mlflow_run_id``, so a resumed or requeued
  training continues the same MLflow run instead of starting a new one.
- What a run records (config, dataset meta, git commit, artifacts) lives in ``sgexp.run_record``.

Nothing here touches mlflow's process-wide state (``mlflow.set_tracking_uri`` also writes the
``MLFLOW_TRACKING_URI`` environment variable): every call builds an ``MlflowClient`` for the URI it is
given, and the Lightning logger returned by ``make_logger`` does the same. Only global rank zero
creates runs or logs; on other ranks the logger and the ``log_*`` helpers do nothing.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from argparse import Namespace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags

from sgexp.checks import fail

log = logging.getLogger("sgexp.tracking")

RUN_ID_FILE = "mlflow_run_id"
BATCH = 100  # mlflow: at most 100 params or tags per log_batch
ALLOWED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_ALLOWED = f"allowed schemes: {', '.join(ALLOWED_SCHEMES)} (e.g. sqlite:////abs/runs/mlflow.db, http://127.0.0.1:5000)"

Target = MlflowClient | MLFlowLogger


# --------------------------------------------------------------------------- where runs live


def default_tracking_uri(root: Path) -> str:
    """``sqlite:///<abs root>/runs/mlflow.db`` (creates ``runs/``)."""
    runs = Path(root).resolve() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def default_artifact_root(root: Path) -> str:
    """``<abs root>/runs/mlartifacts``: a plain absolute path, which mlflow 3 stores as given."""
    return str(Path(root).resolve() / "runs" / "mlartifacts")


def resolve_tracking_uri(configured: str | None, root: Path) -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``default_tracking_uri(root)``."""
    for uri in (configured, os.environ.get("MLFLOW_TRACKING_URI")):
        if uri is not None and str(uri).strip():
            return str(uri).strip()
    return default_tracking_uri(root)


def _scheme(uri: str) -> str:
    if "://" in uri:
        return uri.split("://", 1)[0].split("+", 1)[0].lower()  # postgresql+psycopg2 -> postgresql
    return "databricks" if uri == "databricks" else ("file" if uri.startswith("file:") else "")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` in memory); relative paths are from the CWD."""
    path = unquote(uri[len("sqlite://") :].split("?", 1)[0])[1:]
    return None if path in ("", ":memory:") else Path(path)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail now, with a message that says what to do, if ``uri`` cannot work.

    ``sqlite``: creates the database's directory. ``http(s)``: one GET of ``<uri>/health`` (no retries)
    that must answer 200 (or 401/403 from an auth proxy) within ``timeout`` seconds, else
    ``RuntimeError`` naming the URI and what to do; honours ``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_SERVER_CERT_PATH`` and ``REQUESTS_CA_BUNDLE`` as mlflow does. Other database and
    databricks URIs are not probed. ``file:`` URIs, plain paths and unknown schemes: ``ValueError``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise fail("tracking_uri", uri, _ALLOWED)
    scheme = _scheme(uri)
    if scheme in ("file", ""):
        raise fail("tracking_uri", uri, f"mlflow 3 refuses the file store (file: URIs and plain paths); {_ALLOWED}")
    if scheme not in ALLOWED_SCHEMES:
        raise fail("tracking_uri", uri, _ALLOWED)
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    elif scheme in ("http", "https"):
        _probe_http(uri, timeout)


def tracking_uri_for(logger_cfg: Any, root: Path, override: str | None = None) -> str | None:
    """The one place every entry point turns its ``logger`` config into a checked tracking URI.

    ``None`` when tracking is off (``logger.enabled: false``); otherwise ``override``, the
    configured URI, ``$MLFLOW_TRACKING_URI`` or the repository's sqlite store, in that order,
    checked now (``check_tracking_uri``) so a bad URI fails before any expensive work."""
    if not logger_cfg.enabled:
        return None
    uri = resolve_tracking_uri(override or logger_cfg.tracking_uri, Path(root))
    check_tracking_uri(uri)
    return uri


def init_store(uri: str) -> None:
    """Create a sqlite store's tables now. Every rank builds an ``MlflowClient`` (Lightning's logger does),
    and processes that open a fresh sqlite file at the same moment race on its schema migration: a SLURM
    submission therefore creates the tables on the login node first. Other stores: nothing to do."""
    check_tracking_uri(uri)
    if _scheme(uri) == "sqlite":
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _probe_http(uri: str, timeout: float) -> None:
    url = uri.rstrip("/") + "/health"
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            context = None
            if url.startswith("https") and os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
                context = ssl._create_unverified_context()
            elif url.startswith("https"):  # the CA bundles mlflow's requests session would use
                names = ("MLFLOW_TRACKING_SERVER_CERT_PATH", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
                ca = next((os.environ[n] for n in names if os.environ.get(n)), None)
                context = ssl.create_default_context(**{"capath" if ca and os.path.isdir(ca) else "cafile": ca})
            with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
                outcome["status"] = response.status
        except urllib.error.HTTPError as error:
            outcome["status"] = error.code
        except Exception as error:  # refused, timeout, DNS, TLS: all mean "mlflow cannot use it"
            outcome["error"] = f"{type(error).__name__}: {getattr(error, 'reason', error)}"

    # A thread bounds the whole check, DNS resolution included (socket timeouts do not cover it).
    worker = threading.Thread(target=probe, name="sgexp-mlflow-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if worker.is_alive():
        reason = f"no answer within {timeout:g} s"
    elif "error" in outcome:
        reason = outcome["error"]
    elif outcome["status"] not in (200, 401, 403):  # 401/403: an auth proxy in front of mlflow
        reason = f"GET {url} answered HTTP {outcome['status']}, not an MLflow server's 200"
    else:
        return
    raise RuntimeError(
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it (`make ui`, or `mlflow server "
        f"--host 127.0.0.1 --port <port> --workers 1`), or fix logger.tracking_uri, or unset MLFLOW_TRACKING_URI "
        f"to use the local default sqlite:///<root>/runs/mlflow.db."
    )


def artifact_root_for(tracking_uri: str, artifact_root: str | None) -> str | None:
    """An explicit root wins; a sqlite store keeps artifacts in ``mlartifacts/`` next to the database
    (mlflow's own default is ``./mlruns`` under the current directory); a server chooses its own."""
    if artifact_root or _scheme(tracking_uri) != "sqlite":
        return artifact_root or None
    path = _sqlite_path(tracking_uri)
    return None if path is None else str(path.resolve().parent / "mlartifacts")


# --------------------------------------------------------------------------- git


def _git(root: Path, *args: str) -> str | None:
    try:  # --no-optional-locks: never take index.lock in a tree somebody else is working in
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(root: Path) -> str | None:
    """The commit checked out at ``root``; ``None`` outside a git work tree or without git."""
    return _git(Path(root), "rev-parse", "HEAD") or None


def git_dirty(root: Path) -> bool | None:
    """Whether tracked files differ from ``HEAD`` (untracked files do not count); ``None`` if unknown."""
    status = _git(Path(root), "status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


# --------------------------------------------------------------------------- run identity


def _read_run_id(id_file: Path, wait: float = 5.0) -> str | None:
    deadline = time.monotonic() + wait
    while id_file.exists():
        run_id = id_file.read_text().strip()
        if run_id:
            if not re.fullmatch(r"[\w-]+", run_id):
                raise RuntimeError(f"{id_file} holds {run_id!r}, not an MLflow run id: delete it to start a new run")
            return run_id
        if time.monotonic() > deadline:  # created by a process that died before writing it
            raise RuntimeError(f"{id_file} is empty: delete it to start a new MLflow run")
        time.sleep(0.05)
    return None


def _claim_run_id(id_file: Path, run_id: str) -> str:
    """Write ``run_id`` unless another process was first (O_EXCL); returns the id that won."""
    try:
        fd = os.open(id_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return _read_run_id(id_file) or run_id
    with os.fdopen(fd, "w") as f:
        f.write(run_id + "\n")
    return run_id


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None, uri: str) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if error.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set logger.experiment to another name"
        )
    return experiment.experiment_id


def open_run(
    run_dir: Path,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    artifact_root: str | None = None,
    tags: dict[str, Any] | None = None,
) -> str:
    """The MLflow run of ``run_dir``: created the first time, the same one ever after.

    The id lives in ``<run_dir>/mlflow_run_id``. A new run goes into ``experiment`` (created with
    ``artifact_root`` if missing; see ``artifact_root_for`` for ``None``) and gets ``tags``, the
    ``sgexp.run_dir`` tag and mlflow's user/source tags. A reopened run is set back to RUNNING and
    gets ``tags`` again. If the file names a run this store does not have (another tracking URI) or a
    deleted run, ``RuntimeError`` says so rather than silently splitting the history. Two processes
    opening a fresh ``run_dir`` at once end up with one run (the loser deletes its own). Call on global
    rank zero (``make_logger`` does).
    """
    check_tracking_uri(tracking_uri)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / RUN_ID_FILE
    client = MlflowClient(tracking_uri=tracking_uri)
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    run_id = _read_run_id(id_file)
    if run_id is None:
        location = artifact_root_for(tracking_uri, artifact_root)
        experiment_id = ensure_experiment(client, experiment, location, tracking_uri)
        created = client.create_run(
            experiment_id, run_name=run_name, tags=resolve_tags({**run_tags, "sgexp.run_dir": str(run_dir)})
        ).info.run_id
        run_id = _claim_run_id(id_file, created)
        if run_id == created:
            return run_id
        client.delete_run(created)
    try:
        info = client.get_run(run_id).info
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RuntimeError(
            f"{id_file} names MLflow run {run_id}, which {tracking_uri} does not have: use the tracking URI "
            f"this run was logged to, or delete {id_file} to start a new MLflow run"
        ) from None
    if info.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow run {run_id} ({id_file}) is deleted in {tracking_uri}: restore it "
            f"(`mlflow runs restore --run-id {run_id}`) or delete {id_file} to start a new run"
        )
    if info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    if run_tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return run_id


# --------------------------------------------------------------------------- Lightning logger


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
                raise RuntimeError("SgexpMLFlowLogger needs a run id: build it with sgexp.tracking.make_logger")
            self._experiment_id = self._mlflow_client.get_run(self._run_id).info.experiment_id
            self._initialized = True
        return self._mlflow_client

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        from sgexp.run_record import _log_params, _plain, flatten_params  # run_record imports this module

        params = vars(params) if isinstance(params, Namespace) else params
        _log_params(self.experiment, self.run_id, flatten_params(_plain(params), sep="/"))

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
