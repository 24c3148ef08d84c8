"""Evaluation throughput: samples/s of whole sampling runs, images/s of feature extraction.

* Sampling: ``generate`` (Euler, per-index noise, labels and routing masks) with
  the MNIST model of ``make train`` (SiT-Tiny/4 on 28×28×1, 10 classes) for
  unguided, CFG and SG, interleaved.
* Features: the ``classifier`` extractor (the project's SmallCNN, loaded through
  ``ClassifierExtractor`` from a checkpoint with random weights: its cost does not
  depend on the weights), and an Inception-V3-shaped network with **random
  weights** run through the real ``InceptionExtractor`` (clean-fid's PIL bicubic
  resize to 299, then the network), because clean-fid's ``inception-2015-12-05.pt``
  cannot be downloaded here. It is torchvision's InceptionV3 up to the 2048-d
  pool, TorchScript-compiled like clean-fid's file; its timing stands in for the
  real file's, its features are meaningless.

    python -m benchmarks.eval_throughput                      # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from benchmarks import timing
from benchmarks.workloads import Workload, build
from sgexp.diffusion import Sampler, cfg, generate, sparse_guidance, unguided
from sgexp.eval.classifier import ClassifierConfig, SmallCNN
from sgexp.eval.features import ClassifierExtractor, InceptionExtractor

MNIST = Workload("SiT-Tiny/4", input_size=28, channels=1, num_classes=10)
META = {"name": "mnist5k", "channels": 1, "resolution": 28, "num_classes": 10}
INCEPTION_LAYERS = (
    "Conv2d_1a_3x3 Conv2d_2a_3x3 Conv2d_2b_3x3 maxpool1 Conv2d_3b_1x1 Conv2d_4a_3x3 maxpool2 Mixed_5b Mixed_5c "
    "Mixed_5d Mixed_6a Mixed_6b Mixed_6c Mixed_6d Mixed_6e Mixed_7a Mixed_7b Mixed_7c avgpool"
).split()


def sampling(batch: int, steps: int, repeats: int, warmup: int) -> list[dict]:
    model = build(MNIST, 0.5, torch.device("cpu")).eval()
    sampler = Sampler("euler", steps)
    rules = {"none": unguided(), "cfg": cfg(1.5), "sg": sparse_guidance(5.0, 0.5, 0.9)}
    shape = (MNIST.channels, MNIST.input_size, MNIST.input_size)

    def run(rule):
        return lambda: generate(sampler, rule, {"main": model}, range(batch), shape, MNIST.num_classes)

    stats = timing.time_interleaved({k: run(r) for k, r in rules.items()}, repeats, warmup)
    return [
        {
            "what": f"sampling {name}",
            "detail": f"{MNIST.name} 28²×1, Euler {steps} steps, batch {batch}",
            "batch": batch,
            "seconds": stats[name].to_dict(),
            "per_second": stats[name].inverse(batch).to_dict(),
            "unit": "samples/s",
        }
        for name in rules
    ]


def classifier_extractor(directory: Path):
    """``ClassifierExtractor`` on a saved SmallCNN with random weights (the real loading path)."""
    config = ClassifierConfig(in_channels=1, resolution=28, num_classes=10)
    path = directory / "classifier.pt"
    torch.save({"config": config.__dict__, "state_dict": SmallCNN(config).state_dict()}, path)
    return ClassifierExtractor(path, META)


class _InceptionLayers(nn.Module):
    """torchvision InceptionV3 up to the pool, exposed as ``layers`` like clean-fid's TorchScript."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3  # only this row needs torchvision (a slow import)

        net = inception_v3(weights=None, aux_logits=False, init_weights=True)
        self.layers = nn.Sequential(*(getattr(net, name) for name in INCEPTION_LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def random_inception_extractor(directory: Path):
    path = directory / "inception-random.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid's file is TorchScript
        torch.jit.script(_InceptionLayers().eval()).save(str(path))
    return InceptionExtractor(path, in_channels=1)


def extraction(batch_classifier: int, batch_inception: int, repeats: int, warmup: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        classifier = classifier_extractor(Path(tmp))
        images = torch.randint(0, 256, (batch_classifier, 1, 28, 28), dtype=torch.uint8, generator=gen)
        stats = timing.time_interleaved({"classifier": lambda: classifier(images)}, repeats, warmup)["classifier"]
        rows.append(_row("features classifier", "SmallCNN, 28²×1, features + logits path", batch_classifier, stats))
        try:
            inception = random_inception_extractor(Path(tmp))
        except Exception as err:  # noqa: BLE001 - report, do not lose the other rows
            timing.log(f"eval_throughput: random Inception unavailable: {err!r}")
            return rows
        images = images[:batch_inception]
        prepared = inception.prepare(images)
        stats = timing.time_interleaved(
            {"resize": lambda: inception.prepare(images), "network": lambda: inception.embed(prepared)},
            repeats,
            max(warmup, 2),  # TorchScript's profiling executor optimises the graph on the second call
        )
        rows.append(
            _row("features inception: resize", "clean-fid PIL bicubic 28→299", batch_inception, stats["resize"])
        )
        rows.append(
            _row("features inception: network", "InceptionV3, RANDOM weights, 299²", batch_inception, stats["network"])
        )
        both = timing.Stats(
            tuple(a + b for a, b in zip(stats["resize"].samples, stats["network"].samples, strict=True))
        )
        rows.append(_row("features inception: total", "resize + network", batch_inception, both))
    return rows


def _row(what: str, detail: str, batch: int, stats: timing.Stats) -> dict:
    return {
        "what": what,
        "detail": detail,
        "batch": batch,
        "seconds": stats.to_dict(),
        "per_second": stats.inverse(batch).to_dict(),
        "unit": "images/s",
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_throughput", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="sampling batch")
    ap.add_argument("--steps", type=int, default=5, help="Euler steps per sample")
    ap.add_argument("--classifier-batch", type=int, default=500)
    ap.add_argument("--inception-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help=timing.THREADS_HELP)
    ap.add_argument("--skip-sampling", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    timing.set_threads(args.threads)
    rows = []
    if not args.skip_sampling:
        timing.log(f"eval_throughput: sampling, batch {args.batch}, {args.steps} steps ...")
        rows += sampling(args.batch, args.steps, args.repeats, args.warmup)
    timing.log("eval_throughput: feature extraction ...")
    rows += extraction(args.classifier_batch, args.inception_batch, args.repeats, args.warmup)
    timing.print_table(
        "Evaluation throughput (cpu)",
        ["what", "detail", "batch", "s per batch", "throughput"],
        [
            (
                r["what"],
                r["detail"],
                r["batch"],
                timing.fmt_range(timing.Stats(tuple(r["seconds"]["samples"])), 3),
                f"{r['per_second']['median']:.1f} {r['unit']}",
            )
            for r in rows
        ],
        caption="Inception row: random weights (the real file cannot be downloaded here); timing only",
    )
    payload = {"benchmark": "eval_throughput", "machine": timing.machine_info("cpu"), "rows": rows}
    timing.log(f"wrote {timing.write_json('eval_throughput', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
