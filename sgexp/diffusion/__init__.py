"""Flow matching, guidance rules and samplers. Pure PyTorch, independent of the network code."""

from sgexp.diffusion.flow import FlowMatching, interpolate, logit_normal_timesteps, predict_data, velocity_target
from sgexp.diffusion.guidance import (
    RULES,
    Branch,
    CrossingScheduleWarning,
    Guidance,
    Pass,
    Rule,
    autoguidance,
    build_guidance,
    cfg,
    cfg_sparse_guidance,
    icg,
    sparse_guidance,
    unguided,
)
from sgexp.diffusion.sampler import SOLVERS, Sampler, generate
from sgexp.diffusion.schedules import Constant, Cosine, as_schedule

__all__ = [
    "RULES",
    "SOLVERS",
    "Branch",
    "Constant",
    "Cosine",
    "CrossingScheduleWarning",
    "FlowMatching",
    "Guidance",
    "Pass",
    "Rule",
    "Sampler",
    "as_schedule",
    "autoguidance",
    "build_guidance",
    "cfg",
    "cfg_sparse_guidance",
    "generate",
    "icg",
    "interpolate",
    "logit_normal_timesteps",
    "predict_data",
    "sparse_guidance",
    "unguided",
    "velocity_target",
]
