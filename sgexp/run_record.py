"""What every MLflow run records: the resolved config, the dataset, the git commit, artifacts.

``log_run_context`` records the resolved config (flattened params + ``config.yaml``), the dataset's
``meta.json``, the git commit and the directories of the run; logging it again on resume is safe.
``log_artifact_file`` and ``log_image`` attach files and sample grids. Every helper takes an explicit
``MlflowClient`` (or the Lightning logger of ``sgexp.lit.mlflow_logger.make_logger``) and a run id: nothing
touches mlflow's process-wide state. Where runs live and how they keep their identity:
``sgexp.tracking``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig
from PIL import Image

from sgexp.checks import fail
from sgexp.tracking import flatten_params, log_params, mlflow_key, to_plain

log = logging.getLogger("sgexp.run_record")

Target = MlflowClient | MLFlowLogger  # where a helper logs: a client (with a run id) or the Lightning logger


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
    config = to_plain(config)
    params = flatten_params(config)
    meta = to_plain(meta) if meta else None
    for field, value in (meta or {}).items():
        if value is None or isinstance(value, bool | int | float | str):
            key = mlflow_key(f"data.{field}")
            if key not in params:
                params[key] = str(value)[:MAX_PARAM_VAL_LENGTH]
            elif params[key] != str(value)[:MAX_PARAM_VAL_LENGTH]:
                params[mlflow_key(f"data.meta.{field}")] = str(value)[:MAX_PARAM_VAL_LENGTH]
    previous_tags = client.get_run(run_id).data.tags
    changed = log_params(client, run_id, params)

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
    with tempfile.TemporaryDirectory(prefix="sgexp-image-") as tmp:
        Image.fromarray(_to_uint8(image)).save(Path(tmp) / name, format="PNG")
        return log_artifact_file(target, Path(tmp) / name, artifact_path, run_id=run_id)
