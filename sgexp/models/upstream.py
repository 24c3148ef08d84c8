"""Import the official DiT, SiT and TREAD checkpoints as sgexp ``DiT`` networks.

    model = load_upstream("sit", "SiT-XL-2-256x256.pt", model="SiT-XL/2")

All three share sgexp's backbone (same layer names and layouts but for the label
table); they differ in conventions, which become ``DiTConfig`` fields, so the
returned model works in sgexp's (t = 1 is noise, output = velocity ε − x₀) and every
sampler, guidance rule and FLOPs count applies unchanged:

* ``sit`` (willisma/SiT): t = 0 is noise and the network predicts x₀ − ε, so
  ``model(x, 1 − t_sit, y) == −SiT(x, t_sit, y)[:, :C]`` (time reversed, unscaled;
  sign flipped; learned-sigma channels dropped).
* ``tread`` (CompVis/tread, its ``rf.py`` flow): already sgexp's convention, with t
  unscaled: ``model(x, t, y) == TREAD(x, t, y)``, and with ``keep=ids_keep`` its
  routed output. Routes are not in the weights: ``routes=[(start, end, ratio)]``.
* ``dit`` (facebookresearch/DiT): a DDPM ε-network, not a flow model: the output at
  ``t = t_ddpm / 1000`` is DiT's ε (its first C channels); ``prediction="epsilon"``
  records it. Offered as an initialisation for fine-tuning.

Shapes, patch, channels, width, depth, classes, MLP ratio, learned sigma and the input
size (from the stored ``pos_embed``, kept as a stored table) come from the weights;
``num_heads`` does not (``model="SiT-XL/2"`` gives the official sizes' values, or pass
it). The label table has ``num_classes + 1`` rows (the null label last), as every
official checkpoint trained with label dropout has. Pure PyTorch.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.models.dit import MODEL_SIZES, DiT, DiTConfig, parse_model_name
from sgexp.models.routing import Route

KINDS = ("dit", "sit", "tread")
# What each kind's network means, as DiTConfig fields (see the module docstring).
CONVENTIONS = {
    "dit": dict(time_scale=1000.0, time_reversed=False, output_sign=1, prediction="epsilon"),
    "sit": dict(time_scale=1.0, time_reversed=True, output_sign=-1, prediction="velocity"),
    "tread": dict(time_scale=1.0, time_reversed=False, output_sign=1, prediction="velocity"),
}
OFFICIAL_SIZES = ("S", "B", "L", "XL")  # the sizes the papers define (and their heads)
WRAPPERS = ("ema", "ema_state_dict", "model", "model_state_dict", "state_dict")  # tried in this order
PREFIXES = ("model.", "module.", "_orig_mod.")  # EDMPrecond, DDP, torch.compile
RENAMES = {"y_embedder.embedding_table.weight": "y_embedder.table.weight"}
REQUIRED = ("pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight")


def load_upstream(
    kind: str,
    source: str | os.PathLike | Mapping,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    routes: Sequence | None = None,
    class_dropout_prob: float = 0.1,
    use_ema: bool = True,
) -> DiT:
    """An sgexp ``DiT`` (eval mode) holding the weights of an official checkpoint.

    ``source``: a checkpoint file as the official code writes it (a bare state dict;
    ``{"ema", "model", ...}``; TREAD's ``{"ema_state_dict", ...}`` of its EDM wrapper,
    keys prefixed ``model.``) or such a dict. ``model``: a registry name whose official
    ``num_heads`` (and, for TREAD, route ``2 → L−4`` at 0.5) are the defaults; its width,
    depth and patch must match the weights. ``routes``: ``[(start, end, selection_ratio)]``
    (inclusive blocks; the ratio is the fraction dropped, sgexp's γ), ``Route``s, TREAD's
    dicts or ``"start:end@ratio"``; ``[]`` is dense. ``use_ema``: prefer the EMA weights
    of a training checkpoint.
    """
    check_choice("kind", kind, KINDS)
    state = read_state_dict(source, use_ema)
    config, weights, _ = convert_state_dict(kind, state, model, num_heads, routes, class_dropout_prob)
    net = DiT(config)
    net.load_state_dict(weights, strict=True)
    return net.eval()


def read_state_dict(source: str | os.PathLike | Mapping, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """The bare upstream state dict inside ``source`` (a file or a loaded object)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint={str(source)!r} is invalid: no such file")
        source = _load(path)
    if not isinstance(source, Mapping):
        raise fail("source", type(source).__name__, "must be a checkpoint file or a (state) dict")
    state = source
    if not _is_state_dict(state):
        names = [w for w in WRAPPERS if use_ema or not w.startswith("ema")]
        found = next((w for w in names if isinstance(source.get(w), Mapping) and _is_state_dict(source[w])), None)
        if found is None:
            keys = sorted(map(str, source))[:8]
            raise fail("source", f"<dict with keys {keys}>", f"holds no state dict under {names}")
        state = source[found]
    state = dict(state)
    while (prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)) is not None:
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _load(path: Path):
    """``torch.load`` of an official file: memory-mapped where the format allows (the index only is
    read until a tensor is used), weights only (train.py checkpoints add an argparse.Namespace)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (pre-zip) files cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)


def _is_state_dict(value: Mapping) -> bool:
    return len(value) > 0 and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def convert_state_dict(
    kind: str,
    state: Mapping[str, torch.Tensor],
    model: str | None = None,
    num_heads: int | None = None,
    routes: Sequence | None = None,
    class_dropout_prob: float = 0.1,
) -> tuple[DiTConfig, dict[str, torch.Tensor], dict]:
    """(config, sgexp state dict, what was inferred) for a bare upstream state dict.

    Every key and shape is checked against the sgexp network before anything is built;
    a mismatch names the key and both shapes.
    """
    check_choice("kind", kind, KINDS)
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise fail("state_dict", f"<{len(state)} keys>", f"missing key {missing[0]!r} (not a {kind} checkpoint?)")
    hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    tokens = state["pos_embed"].shape[-2]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise fail("pos_embed", tuple(state["pos_embed"].shape), "expected (1, N, D) with N a square")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / hidden if fc1 is not None else 4.0
    out = state["final_layer.linear.weight"].shape[0]
    learn_sigma = out == 2 * patch * patch * channels
    if not learn_sigma and out != patch * patch * channels:
        expected = f"({patch * patch * channels}, {hidden}) or ({2 * patch * patch * channels}, {hidden}) with sigma"
        raise ValueError(
            f"final_layer.linear.weight: checkpoint shape {tuple(state['final_layer.linear.weight'].shape)}, "
            f"expected {expected}"
        )
    arch = dict(hidden_size=hidden, depth=depth, patch_size=patch)
    if model is not None:
        size, name_patch = parse_model_name(model)
        arch = dict(hidden_size=size.hidden_size, depth=size.depth, patch_size=name_patch)
        if num_heads is None:
            num_heads = size.num_heads
    if num_heads is None:
        prefix = "SiT" if kind == "sit" else "DiT"
        guess = [f"{prefix}-{n}/{patch}" for n in OFFICIAL_SIZES if _matches(MODEL_SIZES[n], depth, hidden)]
        hint = f" (the weights look like {guess[0]!r})" if guess else ""
        raise fail("num_heads", None, f"the weights do not determine it: pass num_heads or model{hint}")
    check_positive_int("num_heads", num_heads)
    if arch["hidden_size"] % num_heads:
        raise fail("num_heads", num_heads, f"must divide the width {arch['hidden_size']} (x_embedder.proj.weight)")
    config = DiTConfig(
        input_size=grid * arch["patch_size"],
        in_channels=channels,
        **arch,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1,
        class_dropout_prob=class_dropout_prob,
        routes=_routes(kind, routes, model),
        pos_embed="stored",
        **CONVENTIONS[kind],
    )
    weights = {RENAMES.get(k, k): v for k, v in state.items()}
    if learn_sigma:  # keep the first C of each token's (row, col, 2C) outputs
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            w = weights[key]
            weights[key] = w.reshape(patch * patch, 2 * channels, *w.shape[1:])[:, :channels].flatten(0, 1)
    _check_shapes(weights, config, model)
    return config, weights, {"kind": kind, "learn_sigma": learn_sigma, "model": model}


def _matches(size, depth: int, hidden: int) -> bool:
    return size.depth == depth and size.hidden_size == hidden


def _routes(kind: str, routes: Sequence | None, model: str | None) -> tuple[Route, ...]:
    if routes is None:
        if kind != "tread":
            return ()
        if model is None:
            allowed = (
                "TREAD's routes are not in the weights: pass routes=[(start, end, selection_ratio)] "
                "(inclusive blocks; [] for none) or model='DiT-XL/2' for its default 2 -> L-4 at 0.5"
            )
            raise fail("routes", None, allowed)
        return (Route(*parse_model_name(model)[0].route, sparsity=0.5),)
    if isinstance(routes, (str, Route, Mapping)):
        routes = [routes]
    return tuple(_route(r) for r in routes)


def _route(spec) -> Route:
    if isinstance(spec, Route):
        return spec
    if isinstance(spec, str):
        return Route.parse(spec)
    if isinstance(spec, Mapping) and {"start_layer_idx", "end_layer_idx", "selection_ratio"} <= set(spec):
        return Route(int(spec["start_layer_idx"]), int(spec["end_layer_idx"]), float(spec["selection_ratio"]))
    if isinstance(spec, Sequence) and len(spec) == 3:
        return Route(int(spec[0]), int(spec[1]), float(spec[2]))
    raise fail("routes", spec, "each route must be (start, end, selection_ratio), 'start:end@ratio' or a Route")


def _check_shapes(weights: Mapping[str, torch.Tensor], config: DiTConfig, model: str | None) -> None:
    """Every key the sgexp network has, with its shape, and no other (built on the meta device: free)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}
    which = f"model={model!r}" if model else "sgexp"
    for key, shape in expected.items():
        if key not in weights:
            upstream = next((u for u, s in RENAMES.items() if s == key), key)
            raise ValueError(f"{upstream}: missing from the checkpoint ({which} expects shape {shape})")
        if tuple(weights[key].shape) != shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(weights[key].shape)}, {which} expects {shape}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{extra[0]}: unexpected key in the checkpoint ({len(extra)} in all; not a DiT/SiT/TREAD?)")
