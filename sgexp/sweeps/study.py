"""Typed schema of the study files in ``sweeps/`` and their validation.

A study file (``sweeps/<name>.yaml``) pins everything a trial's numbers depend on: the checkpoint, the
search space, the sampler, the number of samples and their seeds (the same for every trial: common random
numbers), plus the optimisation budget. ``load_study`` composes it with Hydra's compose API over the schema
below, so a typo or a wrong type fails naming the key, and then checks that the search space admits only
valid guidance settings (``ValueError`` before any trial, in the ``name=value is invalid: ...`` format of
``sgexp.checks``).

Search space, per guidance family (``space.<family>``): ranges for ``scale`` (w), ``gamma_strong`` (γ_s)
and either ``gamma_weak`` (γ_w, an independent range) or ``gamma_weak_fraction`` (u): with u,
``γ_w = γ_s + u·(gamma_weak_max − γ_s)``, which guarantees γ_s < γ_w for every sampled point (u > 0), as
Sparse Guidance requires (AG+SG's weak branch is another model: its γ_w may lie at or below γ_s). Everything not
searched is fixed by ``fixed`` (default: w = 1, γ = 0). A range with ``step`` takes the values low, low + step, ...
(TPE and GP honour it); ``optuna.sampler: grid`` evaluates the whole grid of one family's stepped ranges
(``sweeps/fig6_ag_sg.yaml``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sgexp.checks import check_guidance_scale, check_positive_int, fail
from sgexp.config import LoggerConfig, PathsConfig, SamplerConfig
from sgexp.diffusion.guidance import RULES
from sgexp.eval.settings import gamma, make_settings
from sgexp.sweeps.space import RANGE_KEYS, FamilySpace

if TYPE_CHECKING:
    import optuna

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"
OBJECTIVES = ("fid", "gflops_per_sample", "relative_to_cfg", "seconds_per_sample")  # all minimised
OPTUNA_SAMPLERS = ("tpe", "gp", "nsga2", "grid")
# What a trial's numbers depend on (``check_resume``): a resumed study must not change them.
FROZEN_KEYS = ("family", "space", "objectives", "sampler", "samples_per_trial", "seed", "extractor", "reference_split")


@dataclass
class RangeConfig:
    """A float range ``[low, high]`` (log-uniform with ``log: true``; on a grid of ``step``)."""

    low: float = MISSING
    high: float = MISSING
    log: bool = False
    step: float | None = None  # values low, low + step, ..., <= high; needed by the grid sampler


@dataclass
class FamilySpaceConfig:
    """The searched parameters of one guidance family; see the module docstring.

    Ranges are ``RangeConfig`` mappings or null, typed ``Any`` because OmegaConf 2.3 cannot merge a mapping
    into a null structured node (``--set space.sg.gamma_weak={low: 0.1, high: 0.9}`` would crash);
    ``validate_study`` checks each against ``RangeConfig``.
    """

    rule: str | None = None  # guidance rule (sgexp.diffusion.guidance.RULES); default: the family's name
    scale: Any = None  # RangeConfig
    gamma_strong: Any = None
    gamma_weak: Any = None
    gamma_weak_fraction: Any = None  # u in (0, 1]: γ_w = γ_s + u·(gamma_weak_max − γ_s)
    gamma_weak_max: float = 0.95
    fixed: dict[str, Any] = field(default_factory=dict)  # other GuidanceSetting fields, e.g. interval


@dataclass
class OptunaConfig:
    sampler: str = "tpe"  # tpe | gp | nsga2 | grid (every point of one family's stepped ranges)
    seed: int = 0  # each process seeds its sampler with a hash of this and its identity (space.process_seed)
    n_startup_trials: int = 10  # random trials before the model-based sampler takes over (tpe, gp)
    population_size: int = 20  # nsga2
    max_retries: int = 1  # times a trial whose worker died is run again before it is a counted FAIL


@dataclass
class HeartbeatConfig:
    interval: float = 5.0  # seconds between heartbeats of a running trial
    timeout: float = 60.0  # a RUNNING trial silent for this long belongs to a dead worker


@dataclass
class StudyConfig:
    name: str = MISSING  # the Optuna study name (and the MLflow parent run's)
    description: str = ""
    checkpoint: str = "latest"  # a .ckpt, a run directory, an MLflow run id, or "latest"
    weak_checkpoint: str | None = None  # AutoGuidance's weak model (ag, ag_sg)
    family: list[str] = MISSING  # families searched; several: a categorical "family" param
    space: dict[str, FamilySpaceConfig] = field(default_factory=dict)
    objectives: list[str] = field(default_factory=lambda: ["fid", "gflops_per_sample"])
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    n_trials: int = 40  # COMPLETE + FAIL trials (baselines included)
    samples_per_trial: int = 1000  # screening fidelity
    final_samples: int = 5000  # re-evaluation of the Pareto set (indices 0..final_samples-1); 0: none
    seed: int = 0  # sample seeds, the same for every trial
    bootstrap: int = 1000  # redraws of the final sample indices for the paired FID intervals; 0: none
    ci_level: float = 0.95  # confidence level of those intervals
    optuna: OptunaConfig = field(default_factory=OptunaConfig)
    baselines: list[dict[str, Any]] = field(default_factory=list)  # GuidanceSetting mappings, enqueued first
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    batch_size: int = 250
    grid_size: int = 100  # samples in each trial's grid
    extractor: str = "auto"  # auto: the dataset's classifier if trained (domain FID), else inception
    inception_weights: str | None = None
    reference_split: str = "val"
    device: str = "auto"
    logger: LoggerConfig = field(default_factory=lambda: LoggerConfig(experiment="sgexp-sweeps"))
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_schema(store: ConfigStore | None = None) -> None:
    """Register ``study_schema``; every study file lists it first in its defaults."""
    (store or ConfigStore.instance()).store(name="study_schema", node=StudyConfig)


def available_studies(sweeps_dir: Path = SWEEPS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(sweeps_dir).glob("*.yaml"))


def load_study(name: str, overrides: Sequence[str] = (), sweeps_dir: Path = SWEEPS_DIR) -> DictConfig:
    """``sweeps/<name>.yaml`` composed with Hydra ``overrides`` (``key=value``), validated."""
    studies = available_studies(sweeps_dir)
    if name not in studies:
        raise fail("study", name, f"no {Path(sweeps_dir) / (str(name) + '.yaml')}; the studies are {studies}")
    register_schema()
    with initialize_config_dir(config_dir=str(Path(sweeps_dir).resolve()), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides))
    validate_study(cfg)
    return cfg


# --------------------------------------------------------------------------- validation


def _as_range(key: str, value: Any) -> DictConfig:
    """``value`` checked against ``RangeConfig`` (keys and types), as a DictConfig."""
    try:
        r = OmegaConf.merge(OmegaConf.structured(RangeConfig), value)
        if not OmegaConf.is_missing(r, "low") and not OmegaConf.is_missing(r, "high"):
            return r
    except Exception:  # omegaconf: unknown key, wrong type, not a mapping
        pass
    plain = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    raise fail(key, plain, "a range is {low: NUMBER, high: NUMBER} (and optionally log: true)")


def _check_range(key: str, r: DictConfig) -> None:
    """A well-formed range: finite, ``low < high``, positive when log-uniform, a step that fits.

    Which values a parameter may take is the rule's business (``_check_family``, ``corner_settings``)."""
    low, high = float(r.low), float(r.high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise fail(key, dict(low=low, high=high), "low and high must be finite numbers")
    if low >= high:
        raise fail(key, dict(low=low, high=high), "needs low < high (fix a value with `fixed` instead)")
    if r.log and low <= 0:
        raise fail(key, dict(low=low, high=high, log=True), "a log-uniform range needs low > 0")
    if r.step is not None and (r.log or not 0 < float(r.step) <= high - low):
        raise fail(f"{key}.step", r.step, f"must lie in (0, high - low = {high - low:g}] and not with log: true")


def _check_family(prefix: str, name: str, fam: DictConfig, weak_checkpoint: str | None) -> None:
    """What is specific to a search space: its ranges, what it searches and how γ_w relates to γ_s over
    the whole range. Whether each guidance setting is valid is the rule's to say: ``validate_study``
    builds the rule at every corner of the space."""
    rule = fam.rule or name
    if rule not in RULES:
        raise fail(f"{prefix}.rule", rule, f"must be one of {list(RULES)} (set `rule` if the family name is not one)")
    spec = RULES[rule]
    for key in RANGE_KEYS:
        if fam[key] is not None:
            fam[key] = _as_range(f"{prefix}.{key}", fam[key])
            _check_range(f"{prefix}.{key}", fam[key])
    searched = [k for k in RANGE_KEYS if fam[k] is not None]
    if not searched:
        raise fail(prefix, name, f"searches nothing: give at least one range of {list(RANGE_KEYS)}")
    clash = sorted((set(searched) | {"rule"}) & set(fam.fixed))
    if clash:
        raise fail(f"{prefix}.fixed", dict(fam.fixed), f"keys {clash} are searched or set by `rule`")
    # A parameter the rule ignores would spend trials on one setting; the fraction u sets γ_w.
    reads = ["scale", *spec.reads] if spec.weak is not None else list(spec.reads)
    for key in searched:
        if key.replace("_fraction", "") not in reads:
            raise fail(f"{prefix}.{key}", dict(fam[key]), f"rule {rule!r} does not read it (it reads {reads})")
    # Each end of a range must be a value of its parameter (the checks guidance itself applies), before
    # the ranges are related to each other below.
    for key in searched:
        for end in (float(fam[key].low), float(fam[key].high)):
            if key == "scale":
                check_guidance_scale(f"{prefix}.scale", end)
            elif key != "gamma_weak_fraction":
                gamma(f"{prefix}.{key}", end)
    gs_max = fam.gamma_strong.high if fam.gamma_strong is not None else float(fam.fixed.get("gamma_strong", 0))
    if fam.gamma_weak_fraction is not None:
        u = fam.gamma_weak_fraction
        if fam.gamma_weak is not None:
            raise fail(f"{prefix}.gamma_weak_fraction", "set", "give gamma_weak or gamma_weak_fraction, not both")
        if not 0 < u.low < u.high <= 1:
            raise fail(f"{prefix}.gamma_weak_fraction", dict(low=u.low, high=u.high), "u in (0, 1] keeps γ_s < γ_w")
        if not gs_max < fam.gamma_weak_max < 1.0:
            raise fail(f"{prefix}.gamma_weak_max", fam.gamma_weak_max, f"must lie in (max γ_s = {gs_max:g}, 1)")
    elif spec.ordered and fam.gamma_weak is not None:  # an independent γ_w range must stay above every γ_s
        if fam.gamma_weak.low <= gs_max:
            raise fail(
                f"{prefix}.gamma_weak.low",
                fam.gamma_weak.low,
                f"admits γ_w <= γ_s (γ_s up to {gs_max:g}); {spec.label} needs γ_s < γ_w: use gamma_weak_fraction",
            )
    if spec.needs_weak_model and not weak_checkpoint:
        raise fail("weak_checkpoint", weak_checkpoint, f"family {name!r} (AutoGuidance) needs a weak checkpoint")


def corner_settings(family: str, fam: DictConfig) -> list[dict]:
    """Guidance settings at every corner of a family's box: all valid iff the whole box is (monotone maps)."""
    space = FamilySpace.from_config(family, fam)
    corners = itertools.product(*[(d.low, d.high) for d in space.ranges.values()])
    return [space.setting(dict(zip(space.ranges, corner, strict=True))) for corner in corners]


def validate_study(cfg: DictConfig) -> None:
    """Every check that needs no checkpoint; raises ``ValueError`` naming the bad key."""
    if not cfg.family:
        raise fail("family", list(cfg.family), "name at least one family of `space`")
    for name in cfg.family:
        if name not in cfg.space:
            raise fail("family", list(cfg.family), f"{name!r} has no entry in space (has {sorted(cfg.space)})")
        _check_family(f"space.{name}", name, cfg.space[name], cfg.weak_checkpoint)
        for corner in corner_settings(name, cfg.space[name]):
            try:  # the rule decides which settings are valid; the error names the family
                make_settings({name: corner}, prefix="space")
            except ValueError as err:
                raise ValueError(f"{err} (a corner of the searched ranges: {corner})") from None
    objectives = list(cfg.objectives)
    if len(objectives) != 2 or len(set(objectives)) != 2 or not set(objectives) <= set(OBJECTIVES):
        raise fail("objectives", objectives, f"two distinct minimised metrics of {list(OBJECTIVES)}")
    if cfg.optuna.sampler not in OPTUNA_SAMPLERS:
        raise fail("optuna.sampler", cfg.optuna.sampler, f"must be one of {list(OPTUNA_SAMPLERS)}")
    if cfg.optuna.sampler == "grid":
        _check_grid(cfg)
    for key in ("n_trials", "samples_per_trial", "batch_size"):
        check_positive_int(key, cfg[key])
    if cfg.optuna.population_size < 2:
        raise fail("optuna.population_size", cfg.optuna.population_size, "must be >= 2")
    if cfg.final_samples and cfg.final_samples <= cfg.samples_per_trial:
        raise fail("final_samples", cfg.final_samples, f"must be 0 (no re-evaluation) or > {cfg.samples_per_trial}")
    if cfg.final_samples < 0 or cfg.grid_size < 0 or cfg.optuna.n_startup_trials < 0:
        raise fail("final_samples/grid_size/n_startup_trials", "negative", "must be >= 0")
    retries = cfg.optuna.max_retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise fail("optuna.max_retries", retries, "must be an integer >= 0 (runs of a trial after its worker died)")
    if not 0 < cfg.heartbeat.interval <= cfg.heartbeat.timeout / 2:
        raise fail("heartbeat.interval", cfg.heartbeat.interval, "must be in (0, heartbeat.timeout / 2]")
    baselines = {f"baselines[{i}]": b for i, b in enumerate(OmegaConf.to_container(cfg.baselines))}
    settings = make_settings(baselines, prefix="")  # a bad baseline fails before any trial, named
    if any("weak" in s.rule.models for s in settings) and not cfg.weak_checkpoint:
        raise fail("weak_checkpoint", None, "a baseline uses AutoGuidance, which needs a weak checkpoint")


def _check_grid(cfg: DictConfig) -> None:
    """The grid sampler: one family, every searched range stepped, and no more trials than grid points
    plus baselines (beyond that Optuna's GridSampler would evaluate points again)."""
    if len(cfg.family) != 1:
        raise fail("optuna.sampler", "grid", f"searches one family, not {list(cfg.family)}")
    name = cfg.family[0]
    unstepped = [k for k in RANGE_KEYS if cfg.space[name][k] is not None and cfg.space[name][k].step is None]
    if unstepped:
        raise fail(f"space.{name}.{unstepped[0]}.step", None, "the grid sampler needs a step on every searched range")
    points = math.prod(len(v) for v in FamilySpace.from_config(name, cfg.space[name]).grid().values())
    if cfg.n_trials > points + len(cfg.baselines):
        raise fail("n_trials", cfg.n_trials, f"exceeds the grid's {points} points + {len(cfg.baselines)} baselines")


# --------------------------------------------------------------------------- Optuna's own tools


def name_objectives(study: optuna.Study, objectives: Sequence[str] | None = None) -> list[str]:
    """Give the study's values their names (``study.set_metric_names``): Optuna's plots and optuna-dashboard
    then label the axes "fid" and "gflops_per_sample" instead of "Objective 0/1".

    ``objectives`` default to the study's stored config (``objectives``), else ``("fid",
    "gflops_per_sample")``. Written only when they differ from the stored names (every worker and resume
    calls this); returns the names."""
    if objectives is None:
        config = study.user_attrs.get("config")
        objectives = (config or {}).get("objectives") if isinstance(config, dict) else None
    names = [str(o) for o in (objectives or OBJECTIVES[:2])]
    if len(names) != len(study.directions):
        raise fail("objectives", names, f"study {study.study_name!r} has {len(study.directions)} objectives")
    if study.metric_names != names:
        from optuna.exceptions import ExperimentalWarning  # optuna itself only under TYPE_CHECKING here

        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", category=ExperimentalWarning)
            study.set_metric_names(names)
    return names


# --------------------------------------------------------------------------- resuming


def _unset_steps_dropped(space: Any) -> Any:
    """``space`` without ``step: null`` in its ranges: studies stored before ranges had a step stay resumable."""
    if isinstance(space, dict):
        return {k: _unset_steps_dropped(v) for k, v in space.items() if not (k == "step" and v is None)}
    return space


def frozen_config(cfg: DictConfig | dict) -> dict:
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    frozen = {k: plain.get(k) for k in FROZEN_KEYS}
    frozen["space"] = _unset_steps_dropped(frozen["space"])
    return frozen


def check_resume(study: optuna.Study, cfg: DictConfig, checkpoint: Path) -> None:
    """A resumed study must keep what its trials' numbers depend on (the budget may change)."""
    if len(study.directions) != 2:
        raise fail("study", study.study_name, f"has {len(study.directions)} objectives in this storage, not 2")
    old_ckpt, old = study.user_attrs.get("checkpoint"), study.user_attrs.get("config")
    if old_ckpt is not None and old_ckpt != str(checkpoint):
        raise fail(
            "checkpoint",
            str(checkpoint),
            f"study {study.study_name!r} in this storage was run on {old_ckpt}: resume with --set "
            f"checkpoint={old_ckpt}, or start a new study (--set name=NEW or another --storage)",
        )
    if old is not None:
        before, now = frozen_config(old), frozen_config(cfg)
        changed = {k: (before[k], now[k]) for k in FROZEN_KEYS if before[k] != now[k]}
        if changed:
            raise fail(
                "study",
                study.study_name,
                f"resuming with changed {sorted(changed)} (stored, new: {changed}) would mix incomparable "
                "trials: keep them, or start a new study (--set name=NEW or another --storage)",
            )
