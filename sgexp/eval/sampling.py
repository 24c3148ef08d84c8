"""Generate and score samples for one guidance setting, on one process or many.

Sample ``i`` takes its noise, label and routing masks from seeds of
``(base_seed, i)`` (``sgexp.diffusion.seeds``), so every setting is scored on
the same samples (common random numbers) and the result does not depend on the
batch size or on how indices are spread over processes. Rank ``r`` of ``W``
generates indices ``r, r+W, r+2W, ...``, extracts their features itself (with
``inception_tf`` also sFID's spatial features, from the same pass), and only
features (not images) are gathered: that is what scales to 50k ImageNet samples.
With ``npz`` the images also go, batch by batch, to the rank's shard of an
ADM-evaluator npz that rank 0 merges (``sgexp.eval.export``).

Labels are ``balanced`` (``i mod C``) or ``uniform`` (drawn per index, as DiT's
``sample_ddp.py`` does; the ImageNet protocols use it): ``sgexp.diffusion.seeds.sample_labels``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.diffusion.guidance import Guidance, cfg
from sgexp.diffusion.sampler import Sampler, generate
from sgexp.diffusion.seeds import LABEL_MODES
from sgexp.eval.export import ShardWriter, merge_shards
from sgexp.eval.metrics import score_features
from sgexp.flops import sample_cost
from sgexp.models.dit import DiTConfig
from sgexp.progress import track


@dataclass(frozen=True)
class Setting:
    """A named guidance rule, e.g. ``Setting("sg5", sparse_guidance(5, 0.5, 0.9))``."""

    name: str
    rule: Guidance


@dataclass
class Scored:
    """Per-process output of ``sample_and_extract``."""

    indices: np.ndarray
    labels: np.ndarray
    features: np.ndarray
    logits: np.ndarray | None
    seconds: float
    grid: torch.Tensor | None = field(default=None, repr=False)
    spatial: np.ndarray | None = field(default=None, repr=False)  # sFID's features (inception_tf), like features


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 [0, 255], rounding as a PNG writer would."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Strided split: rank r gets r, r+W, ...; ranks beyond the samples get none."""
    return list(range(rank, num_samples, world_size))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def sample_and_extract(
    setting: Setting,
    models: Mapping[str, torch.nn.Module],
    sampler: Sampler,
    extractor: torch.nn.Module | None,
    num_samples: int,
    shape: Sequence[int],
    num_classes: int,
    base_seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grid_size: int = 0,
    progress: Callable[[int], None] | None = None,
    labels: str = "balanced",
    npz: Path | None = None,
    show_progress: bool = True,
) -> Scored:
    """This process's share of the samples: generate, decode, extract features (and logits).

    ``decode`` maps model outputs to images in [-1, 1] (e.g. an SD-VAE decoder for
    latents); ``grid_size`` keeps the first samples (by index) for a sample grid.
    ``labels`` is the label mode (``balanced`` or ``uniform``). With ``npz``, the images
    are appended to this rank's shard of that file (``score_setting`` merges them).
    Rank 0 shows the pass's progress (``sgexp.progress``) unless ``show_progress``
    is False; ``progress(n)``, if given, is also called after each batch with the samples
    of the whole pass (all ranks) it completed, as the display counts them.
    Without an ``extractor`` only the grid (and timing) is produced; an extractor with
    ``spatial_dim`` also gives sFID's spatial features (``Scored.spatial``).
    """
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    check_choice("labels", labels, LABEL_MODES)
    rank, world = _world()
    if npz is not None and world == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would write all samples to the same shard
        raise fail("npz", str(npz), "needs an initialised process group when several processes run (WORLD_SIZE > 1)")
    mine = rank_indices(num_samples, rank, world)
    with_logits = extractor is not None and getattr(extractor, "num_classes", None) is not None
    with_spatial = extractor is not None and getattr(extractor, "spatial_dim", 0) > 0
    writer = ShardWriter(npz, rank, len(mine)) if npz is not None else None
    feats, logits, spatial, classes, grid = [], [], [], [], []
    seconds, shown = 0.0, 0
    with track(f"{setting.name:>12}", total=num_samples, enabled=show_progress) as advance:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            t0 = time.perf_counter()
            samples, y = generate(
                sampler, setting.rule, models, batch, shape, num_classes, base_seed, label_mode=labels, device=device
            )
            images = to_uint8(decode(samples) if decode is not None else samples)
            if device != "cpu" and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0  # sampling (and decoding) only, not features or export
            if with_logits:  # the classifier gives both in one pass
                f, z = extractor.features_and_logits(images)
                feats.append(f.float().cpu().numpy())
                logits.append(z.float().cpu().numpy())
            elif with_spatial:  # pool and spatial features from one network pass
                f, s = extractor.features_and_spatial(images)
                feats.append(f.float().cpu().numpy())
                spatial.append(s.float().cpu().numpy())
            elif extractor is not None:
                feats.append(extractor(images).float().cpu().numpy())
            classes.append(y.cpu().numpy())
            keep = [k for k, i in enumerate(batch) if i < grid_size]
            if keep:
                grid.append(images[keep].cpu())
            if writer is not None:
                writer.add(batch, images, y)
            # Ranks move in step: when rank 0 has index i, the others have those below i + W.
            done = min(num_samples, batch[-1] + world)
            advance(done - shown)
            if progress is not None:
                progress(done - shown)
            shown = done
    if writer is not None:
        writer.close()
    dim = getattr(extractor, "dim", 0)
    return Scored(
        indices=np.asarray(mine, dtype=np.int64),
        labels=np.concatenate(classes) if classes else np.zeros(0, np.int64),
        features=np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
        logits=(np.concatenate(logits) if logits else np.zeros((0, extractor.num_classes), np.float32))
        if with_logits
        else None,
        seconds=seconds,
        grid=torch.cat(grid) if grid else None,
        spatial=(np.concatenate(spatial) if spatial else np.zeros((0, extractor.spatial_dim), np.float32))
        if with_spatial
        else None,
    )


def gather(scored: Scored) -> Scored:
    """All processes' results on every process, in index order (a no-op on one process).

    Wall time is the slowest process's: that is when the samples were all there.
    """
    rank, world = _world()
    if world == 1:
        return scored
    parts: list[Scored | None] = [None] * world
    dist.all_gather_object(parts, scored)
    order = np.argsort(np.concatenate([p.indices for p in parts]), kind="stable")

    def cat(key: str) -> np.ndarray:
        rows = np.concatenate([getattr(p, key) for p in parts])
        # without an extractor (grids and timings only) features are (0, d) on every rank: nothing to order
        return rows[order] if len(rows) == len(order) else rows

    grids = [(p.indices[: len(p.grid)], p.grid) for p in parts if p.grid is not None]
    grid = None
    if grids:
        idx = np.concatenate([i for i, _ in grids])
        grid = torch.cat([g for _, g in grids])[torch.as_tensor(np.argsort(idx, kind="stable"))]
    return Scored(
        indices=cat("indices"),
        labels=cat("labels"),
        features=cat("features"),
        logits=cat("logits") if scored.logits is not None else None,
        seconds=max(p.seconds for p in parts),
        grid=grid,
        spatial=cat("spatial") if scored.spatial is not None else None,
    )


def cost_summary(
    setting: Setting, configs: Mapping[str, DiTConfig], sampler: Sampler, seconds: float, num_samples: int
) -> dict:
    """GFLOPs of the rule as run (analytic) and measured time, for a results row. ``gflops_per_sample_unshared``
    counts every pass in full, the paper's convention (``gflops_per_sample`` runs SG's dense prefix once)."""
    cost = sample_cost(configs, setting.rule, sampler)
    cfg_cost = sample_cost(configs["main"], cfg(2.0), sampler)  # two dense passes per evaluation
    return {
        "gflops_per_sample": cost.gflops_per_sample,
        "gflops_per_sample_unshared": sample_cost(configs, setting.rule, sampler, share_prefix=False).gflops_per_sample,
        "gflops_per_step": cost.gflops_per_step,
        "passes_per_step": cost.passes_per_step,
        "relative_to_cfg": cost.gflops_per_sample / cfg_cost.gflops_per_sample,
        "seconds_per_sample": seconds / num_samples,
        "samples_per_second": num_samples / seconds if seconds > 0 else float("nan"),
        "num_samples": num_samples,
    }


def save_grid(images: torch.Tensor, path: Path, nrow: int) -> Path:
    """uint8 (B, C, H, W) -> PNG grid."""
    from torchvision.utils import save_image  # torchvision loads in seconds: only where grids are saved

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float() / 255.0, path, nrow=nrow, padding=1)
    return path


def score_setting(
    setting: Setting,
    models: Mapping[str, torch.nn.Module],
    configs: Mapping[str, DiTConfig],
    sampler: Sampler,
    extractor: torch.nn.Module | None,
    reference,
    num_samples: int,
    base_seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grid_size: int = 0,
    progress: Callable[[int], None] | None = None,
    labels: str = "balanced",
    npz: Path | None = None,
    show_progress: bool = True,
) -> tuple[dict, Scored]:
    """One results row (quality, cost, time) and the gathered ``Scored`` it came from: the
    features (and spatial features) in sample-index order (what bootstrap intervals resample)
    and the grid images.

    Metrics need an ``extractor`` and its ``reference`` statistics; every process
    returns the same row. ``labels``: the label mode (recorded as ``row["labels"]``).
    ``npz``: also write the samples there for ADM's evaluator (``sgexp.eval.export``);
    ``row["npz"]`` is its file name (it is written in the results directory).
    """
    main = configs["main"]
    shape = (main.in_channels, main.input_size, main.input_size)
    scored = sample_and_extract(
        setting,
        models,
        sampler,
        extractor,
        num_samples,
        shape,
        main.num_classes,
        base_seed,
        batch_size,
        device,
        decode,
        grid_size,
        progress,
        labels,
        npz,
        show_progress,
    )
    scored = gather(scored)  # also a barrier: every rank has closed its shard
    if npz is not None and _world()[0] == 0:
        merge_shards(npz, num_samples)
    row = {"setting": setting.name, **setting.rule.to_dict(), "solver": sampler.solver, "steps": sampler.num_steps}
    row["labels"] = labels
    if npz is not None:
        row["npz"] = Path(npz).name
    row.update(cost_summary(setting, configs, sampler, scored.seconds, num_samples))
    if extractor is not None and reference is not None:
        row.update(score_features(extractor, scored.features, scored.logits, scored.labels, reference, scored.spatial))
        row["metric"] = extractor.label
    return row, scored
