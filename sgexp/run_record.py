"""What every MLflow run records: the resolved config, the dataset, the git commit, artifacts.

``log_run_context`` records the resolved config (flattened params + ``config.yaml``), the dataset's
``meta.json``, the git commit and the directories of the run; logging it again on resume is safe.
``log_artifact_file`` attaches files; ``log_image`` logs sample grids as MLflow images with a step.

One metric vocabulary for every kind of run (training, ``sgexp.evaluate``, sweep trials), so that one
MLflow chart compares them: ``train/<name>`` and ``val/<name>`` (the Lightning module), and for a scored
guidance setting ``eval/<setting>/<metric>`` (``eval_key``, ``eval_metrics``: ``eval/sg/fid``,
``eval/sg/fid_ci_low``, ``eval/sg/gflops_per_sample``, the grid ``eval/sg/samples``),
``eval/paired/<a>-<b>/<metric>_diff|_ci_low|_ci_high`` (``paired_metrics``). ``<setting>`` is the guidance
setting's name (``none``, ``cfg``, ``sg``, ``cfg_sg``, ...); a sweep trial uses its family. Metrics go to
MLflow in batches (``log_metrics``). Every helper takes an explicit
``MlflowClient`` (or the Lightning logger of ``sgexp.lit.mlflow_logger.make_logger``) and a run id: nothing
touches mlflow's process-wide state. Where runs live and how they keep their identity:
``sgexp.tracking``.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from omegaconf import DictConfig
from PIL import Image

from sgexp.checks import fail
from sgexp.tracking import flatten_params, log_params, mlflow_key, to_plain

log = logging.getLogger("sgexp.run_record")

Target = MlflowClient | MLFlowLogger  # where a helper logs: a client (with a run id) or the Lightning logger
METRIC_BATCH = 1000  # mlflow: at most 1,000 metrics per log_batch


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
    target: Target, image: str | Path | Any, key: str, *, step: int = 0, run_id: str | None = None
) -> str | None:
    """Log a sample grid as an MLflow image ``key`` at ``step`` (``MlflowClient.log_image``): the UI shows
    it among the run's charts with a step slider, next to the same key of other runs. Returns the key.

    ``image`` is an image file (a grid ``save_grid`` wrote; it stays where it is) or an array/tensor (see
    ``_to_uint8``). MLflow keeps it as ``images/<key, / as ~>+step+<step>+...png`` (and a small ``.webp``).
    """
    resolved = _target(target, run_id)
    if resolved is None:
        return None
    client, run_id = resolved
    key = re.sub(r"[^\w\-./ ]", "_", key)  # the characters MlflowClient.log_image accepts
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise FileNotFoundError(f"no image to log to MLflow at {image}")
        with Image.open(image) as png:
            picture = png.convert("RGBA" if png.mode in ("RGBA", "LA", "P") else "RGB")
    else:
        picture = Image.fromarray(_to_uint8(image))
    client.log_image(run_id, picture, key=key, step=int(step), synchronous=True)
    return key


# --------------------------------------------------------------------------- metrics: one vocabulary


def eval_key(setting: str, name: str) -> str:
    """``eval/<setting>/<name>``: a guidance setting's metric (or sample grid) in every kind of run."""
    return mlflow_key(f"eval/{setting}/{name}")


def eval_metrics(setting: str, row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a scored setting's row as ``eval/<setting>/<key>``; an interval ``<m>_ci = [low, high]``
    as ``<m>_ci_low`` and ``<m>_ci_high``. Strings, booleans and other values are not metrics."""
    values = {}
    for key, value in row.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float | np.integer | np.floating):
            values[eval_key(setting, key)] = float(value)
        elif key.endswith("_ci") and isinstance(value, list | tuple) and len(value) == 2:
            values[eval_key(setting, f"{key}_low")] = float(value[0])
            values[eval_key(setting, f"{key}_high")] = float(value[1])
    return values


def paired_metrics(pair: Mapping[str, Any]) -> dict[str, float]:
    """A paired comparison (``sgexp.eval.bootstrap.compare_settings``) of settings a and b: its metric's
    difference a − b and interval as ``eval/paired/<a>-<b>/<metric>_diff|_ci_low|_ci_high``."""
    name = f"eval/paired/{pair['a']}-{pair['b']}/{pair['metric']}"
    low, high = pair["ci"]
    values = {f"{name}_diff": pair["diff"], f"{name}_ci_low": low, f"{name}_ci_high": high}
    return {mlflow_key(k): float(v) for k, v in values.items()}


def log_metrics(target: Target, values: Mapping[str, float], step: int = 0, *, run_id: str | None = None) -> None:
    """Log ``{key: value}`` at ``step`` in one ``log_batch`` per 1,000 values (one round trip, where a
    call per value would queue each on a sqlite store's write lock)."""
    resolved = _target(target, run_id)
    if resolved is None:
        return
    client, run_id = resolved
    now = int(time.time() * 1000)
    metrics = [Metric(mlflow_key(k), float(v), now, int(step)) for k, v in values.items()]
    for start in range(0, len(metrics), METRIC_BATCH):
        client.log_batch(run_id, metrics=metrics[start : start + METRIC_BATCH])
