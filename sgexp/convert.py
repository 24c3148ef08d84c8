"""Convert an official DiT, SiT or TREAD checkpoint into an sgexp checkpoint.

    python -m sgexp.convert --from sit --checkpoint SiT-XL-2-256x256.pt --out runs/sit-xl2/checkpoints/last.ckpt \\
        --model SiT-XL/2 --dataset imagenet256
    python -m sgexp.convert --from tread --checkpoint tread.pt --out tread.ckpt --num-heads 16 --routes 2:24@0.5
    python -m sgexp.evaluate checkpoint=runs/sit-xl2/checkpoints/last.ckpt

The output is what a training run writes (``FlowMatchingModule.load_from_checkpoint``
loads it; model and EMA both hold the imported weights, step 0), so evaluation, sweeps
and fine-tuning take it as they take a trained one. The conventions (time direction,
velocity sign, stored position table) are recorded in the network config; see
``sgexp.models.upstream``. Every argument is checked, and the weights' keys and shapes
are read from the file's index (memory-mapped), before anything is built.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning import __version__ as lightning_version

from sgexp import runs
from sgexp.checks import check_choice, check_positive_int, fail
from sgexp.lit.module import FlowMatchingModule
from sgexp.models.dit import DiTConfig, parse_model_name
from sgexp.models.routing import Route
from sgexp.models.upstream import KINDS, convert_state_dict, read_state_dict

log = logging.getLogger("sgexp.convert")
DATA_ROOT = "data/shards"
UPSTREAM_KEY = "sgexp_upstream"  # where the checkpoint records what it was converted from
META_FIELDS = {"resolution": "input_size", "channels": "in_channels", "num_classes": "num_classes"}


def convert(
    kind: str,
    checkpoint: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    num_heads: int | None = None,
    routes: Sequence[str] | None = None,
    dataset: str | None = None,
    data_dir: str | Path = DATA_ROOT,
    use_ema: bool = True,
    force: bool = False,
) -> Path:
    """Write the sgexp checkpoint ``out`` for the official ``checkpoint``; returns its path.

    ``routes``: ``"start:end@ratio"`` strings (inclusive blocks, ratio = fraction dropped);
    ``dataset``: the prepared dataset evaluation scores against; where
    ``data_dir/dataset/meta.json`` exists, its resolution, channels and classes must match.
    """
    check_choice("--from", kind, KINDS)
    source = Path(checkpoint).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"--checkpoint={str(checkpoint)!r} is invalid: no such file")
    out = Path(out).expanduser()
    if out.is_dir() or out.suffix != ".ckpt":
        raise fail("--out", str(out), "must be a file path ending in .ckpt")
    if out.exists() and not force:
        raise fail("--out", str(out), "exists already (pass --force to replace it)")
    if model is not None:
        parse_model_name(model)
    if num_heads is not None:
        check_positive_int("--num-heads", num_heads)
    parsed = None if routes is None else [Route.parse(r) for r in routes]
    meta = _dataset_meta(dataset, Path(data_dir))

    state = read_state_dict(source, use_ema)  # memory-mapped: keys and shapes only so far
    config, weights, info = convert_state_dict(kind, state, model, num_heads, parsed)
    _check_dataset(config, dataset, meta)
    if config.prediction == "epsilon":
        log.warning(
            "%s is a DDPM ε-prediction network (t = t_ddpm/1000), not a flow model: sgexp's samplers expect a "
            "velocity; use it to initialise fine-tuning",
            source,
        )

    module = FlowMatchingModule(model=config.to_dict(), dataset=dataset)
    with torch.no_grad():
        module.model.load_state_dict(weights, strict=True)
        module.ema.model.load_state_dict(weights, strict=True)
    # The layout of Lightning's ``trainer.save_checkpoint``, without trainer state (step 0).
    state = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning_version,
        "state_dict": module.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
        UPSTREAM_KEY: {**info, "checkpoint": str(source.resolve()), "use_ema": use_ema},
    }
    if not runs.atomic_save(state, out):
        raise fail("--out", str(out), "holds a training checkpoint of a later step; it was left alone")
    return out


def _dataset_meta(dataset: str | None, data_dir: Path) -> dict | None:
    if dataset is None:
        log.warning("no --dataset: sgexp.evaluate needs one to find its reference data")
        return None
    if not dataset or "/" in dataset:
        raise fail("--dataset", dataset, f"must be the name of a prepared dataset under {data_dir}")
    path = data_dir / dataset / "meta.json"
    if not path.is_file():
        log.warning("%s does not exist (yet): the dataset's shape was not checked against the model", path)
        return None
    return json.loads(path.read_text())


def _check_dataset(config: DiTConfig, dataset: str | None, meta: dict | None) -> None:
    for field, attr in META_FIELDS.items():
        value = getattr(config, attr)
        if meta is not None and field in meta and int(meta[field]) != value:
            raise fail("--dataset", dataset, f"its {field} is {meta[field]} but the checkpoint's {attr} is {value}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m sgexp.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="kind", required=True, choices=KINDS, help="which official code wrote it")
    parser.add_argument("--checkpoint", required=True, help="the official checkpoint file")
    parser.add_argument("--out", required=True, help="the sgexp checkpoint to write (.ckpt)")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--model", help="registry name, e.g. SiT-XL/2: its official num_heads (and TREAD route)")
    heads.add_argument("--num-heads", type=int, help="attention heads (the weights do not determine them)")
    parser.add_argument(
        "--routes", nargs="*", metavar="START:END@RATIO", help="TREAD routes, blocks inclusive; none given: dense"
    )
    parser.add_argument("--dataset", help="prepared dataset that evaluation scores against (hparam 'dataset')")
    parser.add_argument("--data-dir", default=DATA_ROOT, help="where prepared datasets live (%(default)s)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the raw, not the EMA weights")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert(
            args.kind,
            args.checkpoint,
            args.out,
            model=args.model,
            num_heads=args.num_heads,
            routes=args.routes,
            dataset=args.dataset,
            data_dir=args.data_dir,
            use_ema=args.use_ema,
            force=args.force,
        )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(out, file=sys.stdout)
    return out


if __name__ == "__main__":
    main()
