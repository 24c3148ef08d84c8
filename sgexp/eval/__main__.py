"""``python -m sgexp.eval {train-classifier,ref-stats} DATASET ...``

    python -m sgexp.eval train-classifier mnist5k                  # -> data/shards/mnist5k/classifier.{pt,json}
    python -m sgexp.eval ref-stats mnist5k --extractor classifier --split train
    python -m sgexp.eval ref-stats imagenet256 --extractor inception --weights /models/inception-2015-12-05.pt

DATASET is a name under ``--root`` (mnist5k and digits are prepared on demand).
"""

from __future__ import annotations

import argparse
import json
import logging

from sgexp.data.prepare import DEFAULT_ROOT


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("dataset", help="dataset name under --root (mnist5k, digits, or one prepared from a folder)")
    common.add_argument("--root", default=DEFAULT_ROOT, help="root of the prepared datasets (%(default)s)")
    common.add_argument("--device", default="cpu", help="torch device (%(default)s)")

    parser = argparse.ArgumentParser(prog="python -m sgexp.eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train-classifier", parents=[common], help="train the domain-FID classifier")
    train.add_argument("--epochs", type=int, default=12, help="training epochs (%(default)s)")
    train.add_argument("--batch-size", type=int, default=64, help="(%(default)s)")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--seed", type=int, default=0, help="(%(default)s)")
    train.add_argument("--max-seconds", type=float, default=None, help="stop after the epoch crossing this time")
    stats = commands.add_parser("ref-stats", parents=[common], help="compute (or check) cached reference statistics")
    stats.add_argument("--extractor", required=True, help="inception | classifier | mnist (= classifier on mnist5k)")
    stats.add_argument("--split", default="train", choices=("train", "val"), help="(%(default)s)")
    stats.add_argument("--weights", default=None, help="Inception weights file (inception-2015-12-05.pt)")
    stats.add_argument("--batch-size", type=int, default=256, help="(%(default)s)")
    stats.add_argument("--max-features", type=int, default=10000, help="raw features kept for precision/recall")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from sgexp.data import ensure_prepared
    from sgexp.eval import build_extractor, reference_stats, stats_path, train_classifier

    try:
        dataset_dir = ensure_prepared(args.dataset, args.root)
        if args.command == "train-classifier":
            info = train_classifier(
                dataset_dir, args.epochs, args.batch_size, args.lr, args.seed, args.device, args.max_seconds
            )
            print(json.dumps(info, indent=2))
        else:
            extractor = build_extractor(args.extractor, dataset_dir, args.device, args.weights)
            ref = reference_stats(extractor, dataset_dir, args.split, args.device, args.batch_size, args.max_features)
            print(f"{stats_path(dataset_dir, extractor.name, args.split)}: {ref.n} images, dim {len(ref.mu)},"
                  f" {len(ref.features)} raw features, {ref.extractor}")  # fmt: skip
    except (ValueError, FileNotFoundError) as exn:
        parser.exit(2, f"{parser.prog} {args.command}: error: {exn}\n")


if __name__ == "__main__":
    main()
