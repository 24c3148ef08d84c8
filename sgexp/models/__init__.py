"""Networks: the DiT/SiT backbone and the TREAD router. Pure PyTorch."""

from sgexp.models.dit import MODEL_SIZES, DiT, DiTConfig, ModelSize, Prefix, build_model, parse_model_name
from sgexp.models.routing import Route, kept_tokens, select_tokens

__all__ = [
    "MODEL_SIZES",
    "DiT",
    "DiTConfig",
    "ModelSize",
    "Prefix",
    "Route",
    "build_model",
    "kept_tokens",
    "parse_model_name",
    "select_tokens",
]
