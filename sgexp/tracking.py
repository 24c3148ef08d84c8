"""MLflow conventions: where runs are stored and how a run keeps its identity.

- Store: always an explicit tracking URI. ``resolve_tracking_uri`` takes the configured value
  (``logger.tracking_uri``), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/runs/mlflow.db``
  with artifacts in ``<root>/runs/mlartifacts``. mlflow 3 refuses the ``file:`` store, so it is
  rejected here with a clear error instead of failing deep inside mlflow.
- Fail fast: ``check_tracking_uri`` asks an ``http(s)://`` server for ``/health`` once, with a short
  timeout, before any mlflow client call (mlflow itself retries HTTP for minutes).
- Identity: ``open_run`` keeps the run id in ``<run_dir>/mlflow_run_id``, so a resumed or requeued
  training continues the same MLflow run instead of starting a new one.
- Params: ``flatten_params`` and ``log_params`` turn a config into mlflow params and log them
  idempotently (the Lightning logger's hyper-parameters and ``sgexp.run_record`` both use them).
- What a run records (config, dataset meta, git commit, artifacts) lives in ``sgexp.run_record``,
  which builds on this module (never the reverse).

Nothing here touches mlflow's process-wide state (``mlflow.set_tracking_uri`` also writes the
``MLFLOW_TRACKING_URI`` environment variable): every call builds an ``MlflowClient`` for the URI it is
given, and the Lightning logger of ``sgexp.lit.mlflow_logger`` does the same. Only global rank zero
creates runs or logs; on other ranks the logger and the ``log_*`` helpers do nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, ListConfig, OmegaConf

from sgexp.checks import fail

log = logging.getLogger("sgexp.tracking")

RUN_ID_FILE = "mlflow_run_id"
# MLflow 3 shows an experiment as GenAI (traces) or model training (runs) by this experiment tag; the
# values are the UI's ExperimentKind enum (mlflow/server/js: "custom_model_development", "genai_development").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
BATCH = 100  # mlflow: at most 100 params or tags per log_batch
ALLOWED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
_ALLOWED = f"allowed schemes: {', '.join(ALLOWED_SCHEMES)} (e.g. sqlite:////abs/runs/mlflow.db, http://127.0.0.1:5000)"


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
    submission therefore creates the tables on the login node first. Other stores: nothing to do.
    ``uri`` is one ``tracking_uri_for`` returned (already checked)."""
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


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI's page of an experiment's runs table (or of one run) on a tracking server; ``None`` for
    a database store (open it with ``make ui``). MLflow 3.17's UI picks its GenAI or model-training view by
    the ``workflowType`` URL parameter, else by what the browser last chose (GenAI at first), not by the
    experiment's kind tag, so the link asks for the model-training view."""
    if _scheme(tracking_uri) not in ("http", "https"):
        return None
    page = f"experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{tracking_uri.rstrip('/')}/#/{page}?workflowType=machine_learning"


def artifact_root_for(tracking_uri: str, artifact_root: str | None) -> str | None:
    """An explicit root wins; a sqlite store keeps artifacts in ``mlartifacts/`` next to the database
    (mlflow's own default is ``./mlruns`` under the current directory); a server chooses its own."""
    if artifact_root or _scheme(tracking_uri) != "sqlite":
        return artifact_root or None
    path = _sqlite_path(tracking_uri)
    return None if path is None else str(path.resolve().parent / "mlartifacts")


# --------------------------------------------------------------------------- params


def to_plain(value: Any) -> Any:
    """Plain YAML/JSON types: resolved OmegaConf containers, lists for tuples, str for the rest."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def mlflow_key(key: str) -> str:
    """A valid mlflow key: letters, digits, ``_ - . / : space``; no empty or ``..`` path parts."""
    key = re.sub(r"[^\w.\- :/]", "_", key).strip("/") or "_"
    key = "/".join(part if part not in ("", ".", "..") else "_" for part in key.split("/"))
    return key[:MAX_ENTITY_KEY_LENGTH]


def flatten_params(config: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """``{"a": {"b": 1, "c": [1, 2]}}`` -> ``{"a.b": "1", "a.c": "[1, 2]"}``.

    Lists become JSON, other values ``str``; values are cut to mlflow's 6,000-character limit and keys
    cleaned of characters mlflow refuses and cut to 250.
    """
    flat: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{key}{sep}{k}" if key else str(k))
        elif key:
            text = json.dumps(node, default=str) if isinstance(node, list | tuple) else str(node)
            flat[mlflow_key(key)] = text[:MAX_PARAM_VAL_LENGTH]

    walk(to_plain(config), "")
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log params not yet on the run; returns ``{key: (logged, new)}`` for values that differ.

    mlflow refuses to change a logged param, so a changed value (typically on resume) keeps the first
    value as the param and records the new one in the tag ``sgexp.param_changed.<key>``.
    """
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    tags = [RunTag(mlflow_key(f"sgexp.param_changed.{k}"), v[:MAX_TAG_VAL_LENGTH]) for k, (_, v) in changed.items()]
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i : i + BATCH])
    for i in range(0, len(tags), BATCH):
        client.log_batch(run_id, tags=tags[i : i + BATCH])
    if changed:
        kept = ", ".join(sorted(changed))
        log.warning("run %s: params kept at their first value, new values in sgexp.param_changed.*: %s", run_id, kept)
    return changed


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
    """The id of experiment ``name``, created (with ``artifact_location``) if missing, declared a model
    training experiment (``EXPERIMENT_KIND_TAG``) so that the MLflow UI opens it on its runs table.

    An experiment made before sgexp declared its kind gets the tag now; a kind someone chose in the UI
    (any value of the tag) is kept."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except MlflowException as error:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if error.error_code != "RESOURCE_ALREADY_EXISTS" or experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted in {uri}: restore it (`mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}`) or set logger.experiment to another name"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
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
