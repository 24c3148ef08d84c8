"""Guidance settings: the ``{name: {rule, scale, gamma_strong, ...}}`` mappings of configs and
command lines, validated into named rules (``Setting``) before any sampling."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import fields

from sgexp.config import GuidanceSetting
from sgexp.diffusion.guidance import build_guidance
from sgexp.eval.sampling import Setting


def make_settings(settings: Mapping[str, Mapping]) -> list[Setting]:
    """``{"sg": {"rule": "sg", "scale": 5, "gamma_strong": "0.5", ...}}`` -> validated settings.

    Every rule is built here, so an invalid setting fails before any training or sampling.
    """
    allowed = {f.name for f in fields(GuidanceSetting)}
    out = []
    for name, spec in settings.items():
        if not isinstance(spec, Mapping):
            raise ValueError(f"guidance.{name}={spec!r} is invalid: expected a mapping with keys {sorted(allowed)}")
        unknown = set(spec) - allowed
        if unknown:
            raise ValueError(
                f"guidance.{name}={dict(spec)!r} is invalid: unknown keys {sorted(unknown)}, allowed {sorted(allowed)}"
            )
        s = GuidanceSetting(**spec)
        interval = tuple(s.interval) if s.interval else None
        with warnings.catch_warnings(record=True) as caught:  # say which setting a rule's warning is about
            warnings.simplefilter("always")
            rule = build_guidance(s.rule, float(s.scale), s.gamma_strong, s.gamma_weak, interval, bool(s.share_prefix))
        for warning in caught:
            warnings.warn(f"guidance setting {name!r}: {warning.message}", warning.category, stacklevel=2)
        out.append(Setting(name, rule))
    return out
