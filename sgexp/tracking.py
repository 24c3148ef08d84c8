"""MLflow conventions: where runs are stored, how a run keeps its identity, what every run records.

- Store: always an explicit tracking URI. ``resolve_tracking_uri`` takes the configured value
  (``logger.tracking_uri``), else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<root>/runs/mlflow.db``
  with artifacts in ``<root>/runs/mlartifacts``. mlflow 3 refuses the ``file:`` store, so it is
  rejected here with a clear error instead of failing deep inside mlflow.
- Fail fast: ``check_tracking_uri`` asks an ``http(s)://`` server for ``/health`` once, with a short
  timeout, before any mlflow client call (mlflow itself retries HTTP for minutes).
- Identity: ``open_run`` keeps the run id in ``<run_dir>/mlflow_run_id``, so a resumed or requeued
  training continues the same MLflow run instead of starting a new one.
- Context: ``log_run_context`` records the resolved config (params + ``config.yaml``), the dataset's
  ``meta.json``, the git commit and the directories of the run; logging it again on resume is safe.

Nothing here touches mlflow's process-wide state (``mlflow.set_tracking_uri`` also writes the
``MLFLOW_TRACKING_URI`` environment variable): every call builds an ``MlflowClient`` for the URI it is
given, and the Lightning logger returned by ``make_logger`` does the same. Only global rank zero
creates runs or logs; on other ranks the logger and the ``log_*`` helpers do nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from argparse import Namespace
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import numpy as np
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig, ListConfig, OmegaConf

from sgexp.checks import fail

log = logging.getLogger("sgexp.tracking")

RUN_ID_FILE = "mlflow_run_id"
_BATCH = 100  # mlflow: at most 100 params or tags per log_batch
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
            self.ensure_experiment = self._mlflow_client.get_run(self._run_id).info.experiment_id
            self._initialized = True
        return self._mlflow_client

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
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


# --------------------------------------------------------------------------- what a run records


def _plain(value: Any) -> Any:
    """Plain YAML/JSON types: resolved OmegaConf containers, lists for tuples, str for the rest."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _key(key: str) -> str:
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
            flat[_key(key)] = text[:MAX_PARAM_VAL_LENGTH]

    walk(_plain(config), "")
    return flat


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Log params not yet on the run; returns ``{key: (logged, new)}`` for values that differ.

    mlflow refuses to change a logged param, so a changed value (typically on resume) keeps the first
    value as the param and records the new one in the tag ``sgexp.param_changed.<key>``.
    """
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in existing]
    changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
    tags = [RunTag(_key(f"sgexp.param_changed.{k}"), v[:MAX_TAG_VAL_LENGTH]) for k, (_, v) in changed.items()]
    for i in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[i : i + _BATCH])
    for i in range(0, len(tags), _BATCH):
        client.log_batch(run_id, tags=tags[i : i + _BATCH])
    if changed:
        log.warning("run %s: params kept at their first value, new values in sgexp.param_changed.*: %s",
                    run_id, ", ".join(sorted(changed)))  # fmt: skip
    return changed


def _target(target: Target, run_id: str | None) -> tuple[MlflowClient, str] | None:
    """(client, run id) to log to, or ``None`` on ranks other than zero."""
    if isinstance(target, MLFlowLogger):
        if rank_zero_only.rank != 0:
            return None
        client, run_id = target.experiment, run_id or target.run_id
    elif isinstance(target, MlflowClient):
        client = target
    else:
        raise TypeError(f"expected an MlflowClient or a Lightning MLFlowLogger, got {type(target).__name__}")
    if not run_id:
        raise fail("run_id", run_id, "a run id is needed (from open_run or logger.run_id)")
    return client, run_id


def log_run_context(
    client_or_logger: Target,
    run_id: str | None,
    *,
    config: Mapping[str, Any] | DictConfig,
    meta: Mapping[str, Any] | None = None,
    checkpoint_dir: Path | None = None,
    root: Path,
) -> dict[str, tuple[str, str]] | None:
    """Record what a run is: config, dataset, code and directories.

    - params: the resolved ``config`` flattened to dotted keys, and the scalar top-level fields of the
      dataset ``meta`` as ``data.<field>`` (a config key of the same name wins; a different meta value
      then goes to ``data.meta.<field>``);
    - artifacts: ``config.yaml`` and ``dataset/meta.json``;
    - tags: ``git.commit``, ``git.dirty`` (of ``root``; ``unknown`` outside git), ``sgexp.checkpoint_dir``
      (``sgexp.run_dir`` is set by ``open_run``).

    Idempotent: on a resumed run, params keep their first values; changed ones are returned as
    ``{key: (logged, new)}`` and tagged ``sgexp.param_changed.<key>``, and the new config and meta are
    kept as ``history/<UTC time>/``. ``config.yaml``/``dataset/meta.json`` always describe the first
    start, the git tags the latest (a changed commit keeps the first in ``git.commit.first``).
    Returns ``None`` (and logs nothing) on ranks other than zero.
    """
    resolved = _target(client_or_logger, run_id)
    if resolved is None:
        return None
    client, run_id = resolved
    config = _plain(config)
    params = flatten_params(config)
    meta = _plain(meta) if meta else None
    for field, value in (meta or {}).items():
        if value is None or isinstance(value, bool | int | float | str):
            key = _key(f"data.{field}")
            if key not in params:
                params[key] = str(value)[:MAX_PARAM_VAL_LENGTH]
            elif params[key] != str(value)[:MAX_PARAM_VAL_LENGTH]:
                params[_key(f"data.meta.{field}")] = str(value)[:MAX_PARAM_VAL_LENGTH]
    previous_tags = client.get_run(run_id).data.tags
    changed = _log_params(client, run_id, params)

    first = not any(f.path == "config.yaml" for f in client.list_artifacts(run_id))
    if first or changed:
        folder = "" if first else f"history/{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
        with tempfile.TemporaryDirectory(prefix="sgexp-context-") as tmp:
            (Path(tmp) / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            client.log_artifact(run_id, str(Path(tmp) / "config.yaml"), folder or None)
            if meta is not None:
                (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=2))
                client.log_artifact(run_id, str(Path(tmp) / "meta.json"), folder or "dataset")

    commit, dirty = git_commit(root), git_dirty(root)
    tags = {"git.commit": commit or "unknown", "git.dirty": "unknown" if dirty is None else str(dirty).lower()}
    first_commit = previous_tags.get("git.commit.first", previous_tags.get("git.commit"))
    if first_commit and first_commit != tags["git.commit"]:
        tags["git.commit.first"] = first_commit
    if checkpoint_dir is not None:
        tags["sgexp.checkpoint_dir"] = str(Path(checkpoint_dir).resolve())
    client.log_batch(run_id, tags=[RunTag(k, v[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()])
    return changed


def log_artifact_file(
    target: Target, path: str | Path, artifact_path: str | None = None, *, run_id: str | None = None
) -> str | None:
    """Upload a file (or a directory's contents) into ``artifact_path``; returns its artifact path."""
    resolved = _target(target, run_id)
    if resolved is None:
        return None
    client, run_id = resolved
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
        return artifact_path or ""
    if not path.is_file():
        raise FileNotFoundError(f"no file to log as an MLflow artifact at {path}")
    client.log_artifact(run_id, str(path), artifact_path)
    return f"{artifact_path}/{path.name}" if artifact_path else path.name


def _to_uint8(image: Any) -> np.ndarray:
    """HxW, HxWxC or CxHxW (C in 1, 3, 4); floats are taken in [0, 1] and clipped."""
    if hasattr(image, "detach"):  # a torch tensor, possibly bf16 on a GPU
        image = image.detach().cpu()
        image = image.float() if image.is_floating_point() else image
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise fail("image.shape", array.shape, "must be HxW, HxWxC or CxHxW with C in (1, 3, 4)")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or np.issubdtype(array.dtype, np.floating):
        return (np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 255:
        return array.astype(np.uint8)
    raise fail("image.dtype", str(array.dtype), "must be uint8, integers in [0, 255] or floats in [0, 1]")


def log_image(
    target: Target,
    image: str | Path | Any,
    artifact_path: str = "samples",
    *,
    name: str | None = None,
    run_id: str | None = None,
) -> str | None:
    """Log a PNG (e.g. a sample grid) into ``artifact_path``; returns its artifact path.

    ``image`` is a PNG file (logged under its own name) or an array/tensor (see ``_to_uint8``) that is
    written as the PNG file ``name``.
    """
    if isinstance(image, str | Path):
        return log_artifact_file(target, image, artifact_path, run_id=run_id)
    if not name:
        raise fail("name", name, "a file name such as 'step-0001000.png' is needed to log an array")
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="sgexp-image-") as tmp:
        Image.fromarray(_to_uint8(image)).save(Path(tmp) / name, format="PNG")
        return log_artifact_file(target, Path(tmp) / name, artifact_path, run_id=run_id)
