"""Guidance settings: the ``{name: {rule, scale, gamma_strong, ...}}`` mappings of configs and
command lines, validated into named rules (``Setting``) before any sampling."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import fields

from sgexp.checks import check_sparsity, fail
from sgexp.config import GuidanceSetting
from sgexp.diffusion.guidance import build_guidance
from sgexp.eval.sampling import Setting

GAMMAS = ("gamma_strong", "gamma_weak")


def make_settings(settings: Mapping[str, Mapping], prefix: str = "guidance") -> list[Setting]:
    """``{"sg": {"rule": "sg", "scale": 5, "gamma_strong": 0.5, ...}}`` -> validated settings.

    Every rule is built here, so an invalid setting fails before any training or sampling, with
    a message naming its key ``<prefix>.<name>`` (``prefix`` is where the mapping sits in the config).
    """
    allowed = [f.name for f in fields(GuidanceSetting)]
    out = []
    for name, spec in settings.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if not isinstance(spec, Mapping):
            raise fail(key, spec, f"expected a mapping with keys {allowed}")
        unknown = sorted(set(spec) - set(allowed))
        if unknown:
            raise fail(key, dict(spec), f"unknown keys {unknown}, allowed {allowed}")
        s = GuidanceSetting(**spec)
        strong, weak = (gamma(f"{key}.{g}", getattr(s, g)) for g in GAMMAS)
        interval = tuple(s.interval) if s.interval else None
        with warnings.catch_warnings(record=True) as caught:  # say which setting a rule's warning is about
            warnings.simplefilter("always")
            try:
                rule = build_guidance(s.rule, float(s.scale), strong, weak, interval, bool(s.share_prefix))
            except ValueError as err:
                raise ValueError(f"{key}: {err}") from None
        for warning in caught:
            warnings.warn(f"guidance setting {name!r}: {warning.message}", warning.category, stacklevel=2)
        out.append(Setting(name, rule))
    return out


def gamma(key: str, value: object) -> float | str:
    """A γ as YAML or a command line gives it (``0.5``, ``"0.5"``, ``cosine:0.6:0``) -> what
    ``build_guidance`` takes: a number in [0, 1), or the cosine string (its ends are checked there)."""
    if isinstance(value, str) and value.startswith("cosine:"):
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise fail(key, value, "expected a number in [0, 1) or 'cosine:START:END'") from None
    return check_sparsity(key, value)
