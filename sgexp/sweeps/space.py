"""A study's search space as Optuna distributions, and sampled parameters as guidance settings.

``SearchSpace.suggest(trial)`` samples one point (define-by-run) and returns ``(family, setting)``, where
``setting`` is what ``sgexp.eval.settings.make_settings`` takes (``rule``, ``scale``, ``gamma_strong``,
``gamma_weak``, ...). Parameter names are the range keys (``scale``, ``gamma_strong``,
``gamma_weak_fraction``) in a one-family study; with several families a categorical ``family`` is sampled
first and the conditional parameters are named ``<family>/<key>``, so each family keeps its own
distributions (TPE's ``group`` mode models them separately).

``SearchSpace.params_for`` inverts the map for baselines, so a baseline inside the space is enqueued with
its coordinates and informs the sampler like any trial. Baselines outside it (another family) are enqueued
without parameters; ``InSpaceSampler`` hides such trials from the sampler, because samplers built on the
intersection search space (GP, multivariate TPE, NSGA-II) would otherwise see an empty intersection and
fall back to random sampling.

Sampler seeds: every process that asks (the driver with one worker, each ``--workers`` process, another
shell running the same command, a SLURM array task) seeds its sampler with ``process_seed``, a hash of
the study's ``optuna.seed`` and the process's identity, so concurrent commands on one study never propose
the same points; the seed is recorded in each trial's ``sampler_seed`` attribute.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

log = logging.getLogger("sgexp.sweeps.space")

SETTING_KEYS = ("scale", "gamma_strong", "gamma_weak")  # the numbers of a setting a trial records
RANGE_KEYS = ("scale", "gamma_strong", "gamma_weak", "gamma_weak_fraction")  # what a family may search


def _number(value: Any) -> Any:
    """``"0.5"`` -> 0.5; schedules (``"cosine:0.6:0"``) and non-numbers stay as they are."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def normalise_setting(setting: Mapping[str, Any]) -> dict[str, Any]:
    """A setting with numbers as floats (YAML baselines give ``gamma_strong: "0.5"``) and plain lists."""
    plain = OmegaConf.to_container(setting) if isinstance(setting, DictConfig) else dict(setting)
    out = {"rule": "none", "scale": 1.0, "gamma_strong": 0.0, "gamma_weak": 0.0, **plain}
    for key in SETTING_KEYS:
        out[key] = _number(out[key])
    return out


def describe(setting: Mapping[str, Any]) -> dict[str, float]:
    """``scale``, ``gamma_strong``, ``gamma_weak`` as floats for trial attributes (0 where not a constant)."""
    values = {k: _number(setting.get(k, 1.0 if k == "scale" else 0.0)) for k in SETTING_KEYS}
    return {k: float(v) if isinstance(v, float) else 0.0 for k, v in values.items()}


@dataclass(frozen=True)
class FamilySpace:
    """The searched ranges of one family (validated by ``sgexp.sweeps.study``) and its fixed values."""

    name: str
    rule: str
    ranges: dict[str, FloatDistribution]  # by range key: scale, gamma_strong, gamma_weak, gamma_weak_fraction
    gamma_weak_max: float
    fixed: dict[str, Any]

    @classmethod
    def from_config(cls, name: str, cfg: DictConfig) -> FamilySpace:
        def dist(r) -> FloatDistribution:
            step = float(r.step) if r.get("step") is not None else None
            return FloatDistribution(float(r.low), float(r.high), log=bool(r.log), step=step)

        ranges = {key: dist(cfg[key]) for key in RANGE_KEYS if cfg[key] is not None}
        fixed = OmegaConf.to_container(cfg.fixed) if isinstance(cfg.fixed, DictConfig) else dict(cfg.fixed)
        return cls(name, cfg.rule or name, ranges, float(cfg.gamma_weak_max), fixed)

    def grid(self) -> dict[str, list[float]]:
        """The values of each stepped range (low, low + step, ..., high), by range key."""
        out = {}
        for key, d in self.ranges.items():
            if d.step is None:
                raise ValueError(f"space.{self.name}.{key} has no step: it is not a grid")
            count = int(math.floor((d.high - d.low) / d.step + 1e-9)) + 1
            out[key] = [round(d.low + i * d.step, 12) for i in range(count)]
        return out

    def setting(self, values: Mapping[str, float]) -> dict[str, Any]:
        """Range values -> a guidance setting; γ_w from the fraction u lies strictly above γ_s for u > 0."""
        setting = normalise_setting({"rule": self.rule, **self.fixed})
        for key in SETTING_KEYS:
            if key in values:
                setting[key] = float(values[key])
        if "gamma_weak_fraction" in values:
            gs = float(setting["gamma_strong"])
            setting["gamma_weak"] = gs + float(values["gamma_weak_fraction"]) * (self.gamma_weak_max - gs)
        return setting

    def coordinates(self, setting: Mapping[str, Any]) -> dict[str, float] | None:
        """The range values that give ``setting``, or None if it lies outside this family's space."""
        setting = normalise_setting(setting)
        if setting["rule"] != self.rule:
            return None
        values: dict[str, float] = {}
        for key, dist in self.ranges.items():
            if key == "gamma_weak_fraction":
                gs, gw = setting["gamma_strong"], setting["gamma_weak"]
                if not (isinstance(gs, float) and isinstance(gw, float)) or gs >= self.gamma_weak_max:
                    return None
                values[key] = (gw - gs) / (self.gamma_weak_max - gs)
            elif isinstance(setting[key], float):
                values[key] = setting[key]
            else:
                return None
            if not dist.low - 1e-12 <= values[key] <= dist.high + 1e-12:
                return None
            values[key] = min(max(values[key], dist.low), dist.high)  # float round-off at the bounds
        rebuilt = self.setting(values)
        same = all(_close(rebuilt.get(k), setting.get(k)) for k in set(rebuilt) | set(setting))
        return values if same else None


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


class SearchSpace:
    """The families of a study (``cfg.family``, ``cfg.space``); see the module docstring."""

    def __init__(self, cfg: DictConfig):
        self.families = {name: FamilySpace.from_config(name, cfg.space[name]) for name in cfg.family}
        self.multi = len(self.families) > 1

    def param_name(self, family: str, key: str) -> str:
        return f"{family}/{key}" if self.multi else key

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter the space can sample (for the MLflow parent run and for checks)."""
        out: dict[str, BaseDistribution] = {}
        if self.multi:
            out["family"] = CategoricalDistribution(list(self.families))
        for name, fam in self.families.items():
            out.update({self.param_name(name, k): d for k, d in fam.ranges.items()})
        return out

    def suggest(self, trial: optuna.Trial) -> tuple[str, dict[str, Any]]:
        """Sample (or, for an enqueued trial, read back) one point: ``(family, setting)``."""
        family = trial.suggest_categorical("family", list(self.families)) if self.multi else next(iter(self.families))
        fam = self.families[family]
        values = {
            key: trial.suggest_float(self.param_name(family, key), d.low, d.high, log=d.log, step=d.step)
            for key, d in fam.ranges.items()
        }
        return family, fam.setting(values)

    def params_for(self, setting: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """``(family, params)`` of a setting inside the space (to enqueue it), else None."""
        for name, fam in self.families.items():
            values = fam.coordinates(setting)
            if values is not None:
                params = {self.param_name(name, k): v for k, v in values.items()}
                return name, ({"family": name, **params} if self.multi else params)
        return None


def enqueue_baselines(study: optuna.Study, cfg: DictConfig, space: SearchSpace) -> int:
    """Enqueue the baselines, once per study: in-space ones with their parameters, others as fixed points."""
    if any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        return 0
    for baseline in cfg.baselines:
        setting = normalise_setting(baseline)
        found = space.params_for(setting)
        if found is not None:
            family, params = found
            study.enqueue_trial(params, user_attrs={"baseline": True, "family": family, "setting": setting})
        else:  # another family: evaluated as a fixed point, hidden from the sampler (see space.InSpaceSampler)
            attrs = {"baseline": True, "family": setting["rule"], "setting": setting, "in_space": False}
            study.enqueue_trial({}, user_attrs=attrs)
    if len(cfg.baselines) > cfg.n_trials:
        log.warning("%d baselines but n_trials=%d: some baselines will not run", len(cfg.baselines), cfg.n_trials)
    return len(cfg.baselines)


# --------------------------------------------------------------------------- samplers


class InSpaceSampler(BaseSampler):
    """Delegates to ``inner`` but hides trials without parameters (out-of-space baselines) from it.

    The hiding is a shallow copy of the study whose ``_get_trials`` filters: every public trial accessor
    of ``optuna.Study`` (``trials``, ``get_trials``, ``best_trials``) goes through it, as do the samplers.
    """

    def __init__(self, inner: BaseSampler, seed: int | None = None):
        self.inner, self.seed = inner, seed  # seed: recorded in each trial (``sampler_seed``)

    @staticmethod
    def _view(study: optuna.Study, current: FrozenTrial | None) -> optuna.Study:
        view = copy.copy(study)
        everything = study._get_trials
        keep = lambda t: bool(t.params) or (current is not None and t.number == current.number)  # noqa: E731

        def _get_trials(deepcopy: bool = True, states=None, use_cache: bool = False) -> list[FrozenTrial]:
            return [t for t in everything(deepcopy=deepcopy, states=states, use_cache=use_cache) if keep(t)]

        view._get_trials = _get_trials
        return view

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(self._view(study, trial), trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(self._view(study, trial), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(self._view(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.inner.before_trial(self._view(study, trial), trial)

    def after_trial(self, study, trial, state, values: Sequence[float] | None):
        self.inner.after_trial(self._view(study, trial), trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def process_seed(study_seed: int, worker: int = 0) -> int:
    """A sampler seed for this process, derived from the study's seed and who and when this process is.

    Two commands on one study (two shells, two hosts, two SLURM array tasks, two ``--workers`` processes)
    must not share a seed: seeded samplers with the same history propose the same points (all the random
    startup trials, for a start)."""
    env = [os.environ.get(k, "") for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID")]
    identity = (int(study_seed), socket.gethostname(), os.getpid(), *env, worker, time.time_ns())
    return int.from_bytes(hashlib.sha256(repr(identity).encode()).digest()[:4], "big")


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler for ask/tell: its ``after_trial`` calls ``study.stop()`` once the grid is done,
    which raises outside ``study.optimize``; the study's budget (at most the grid, ``study._check_grid``)
    ends it instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def make_sampler(cfg: DictConfig, seed: int | None = None) -> BaseSampler:
    """The study's Optuna sampler seeded with ``seed`` (default ``optuna.seed``; workers pass ``process_seed``)."""
    o = cfg.optuna
    seed = int(o.seed) if seed is None else int(seed)
    multi = len(cfg.family) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if o.sampler == "grid":  # one family (study._check_grid): parameters are named by their range keys
            inner = GridSampler(FamilySpace.from_config(cfg.family[0], cfg.space[cfg.family[0]]).grid(), seed=seed)
        elif o.sampler == "gp":
            inner = optuna.samplers.GPSampler(seed=seed, n_startup_trials=o.n_startup_trials)
        elif o.sampler == "nsga2":
            inner = optuna.samplers.NSGAIISampler(seed=seed, population_size=o.population_size)
        else:  # multivariate TPE models the joint (w, γ_s, u) structure; constant liar spreads parallel workers
            inner = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=o.n_startup_trials, multivariate=True, group=multi, constant_liar=True
            )
    return InSpaceSampler(inner, seed)
