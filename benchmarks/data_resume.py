"""Resuming the training data stream: seconds to the first batch at batch 10, 10^4 and 10^6.

A synthetic dataset (``--shards`` × ``--samples`` random 8×8 grey PNGs, written by
sgexp's own prepare code into a temporary folder) is read by ``TrainStream`` with
``start_batch`` set, in the main process (no DataLoader workers), and the time to
the first batch is measured per start, interleaved. The stream finds the window
of ``start_batch`` from meta.json's counts and reads that window only
(``shuffle_shards`` shards), so the time should be flat in the step; batch 10^6
wraps into a later epoch, which is the point. Also reported per start: the bytes
the process read (``/proc/self/io``, Linux), and how long replaying every skipped
sample would take at the measured read rate (what the stream did before: skip
batches after their bytes were read).

    python -m benchmarks.data_resume                  # ~30 s on 2 cores (writing the shards: ~5 s)
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import timing
from sgexp.data.prepare import _prepare_arrays
from sgexp.data.shards import BadSamples, read_meta, shard_urls
from sgexp.data.stream import SHUFFLE_SHARDS, TrainStream, read_shard

STARTS = (10, 10**4, 10**6)
CLASSES = 10


def make_dataset(root: Path, shards: int, samples: int) -> Path:
    """``shards`` train shards of ``samples`` random 8×8 images (and one val image per class).

    prepare writes at least 8 shards: fewer are the same samples in 8 shards.
    """
    n = shards * samples + CLASSES
    images = np.random.default_rng(0).integers(0, 256, (n, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % CLASSES
    arguments = {"val_size": CLASSES, "seed": 0, "shard_size": samples}
    return _prepare_arrays(root / "synthetic", "synthetic", "random", images, labels, arguments, "benchmarks")


def bytes_read() -> int | None:
    """Bytes this process has read so far (rchar: page-cache hits count too); None off Linux."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def read_rate(urls: list[str], meta: dict) -> float:
    """Samples per second that reading whole shards reaches (open, untar, group, field check)."""
    start, n = time.perf_counter(), 0
    for url in urls:
        n += len(read_shard(url, meta, BadSamples()))
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.data_resume", description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=64, help="train shards")
    ap.add_argument("--samples", type=int, default=1000, help="samples per shard")
    ap.add_argument("--batch", type=int, default=32, help="batch size per rank")
    ap.add_argument("--shuffle-shards", type=int, default=SHUFFLE_SHARDS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help=timing.THREADS_HELP)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    timing.set_threads(args.threads)
    logging.getLogger("sgexp.data.prepare").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        timing.log(f"data_resume: writing {args.shards} x {args.samples} samples ...")
        root = make_dataset(Path(tmp), args.shards, args.samples)
        meta = read_meta(root)
        urls = shard_urls(root, meta, "train")

        def first_batch(start: int):
            stream = TrainStream(
                urls, meta, args.batch, BadSamples(), start_batch=start, shuffle_shards=args.shuffle_shards
            )
            return next(iter(stream))

        variants = {start: (lambda start=start: first_batch(start)) for start in STARTS}
        stats = timing.time_interleaved(variants, args.repeats, args.warmup)
        rate = read_rate(urls[: args.shuffle_shards], meta)
        read = {}
        for start in STARTS:
            before = bytes_read()
            first_batch(start)
            read[start] = None if before is None else bytes_read() - before
        shard_bytes = max(Path(url).stat().st_size for url in urls)
    per_epoch = meta["num_train"]
    rows = [
        {
            "start_batch": start,
            "slot": start * args.batch,
            "epoch": start * args.batch // per_epoch,
            "seconds": stats[start].to_dict(),
            "bytes_read": read[start],
            "replay_estimate_seconds": start * args.batch / rate,
        }
        for start in STARTS
    ]
    ratio = timing.paired_ratio(stats[STARTS[-1]], stats[STARTS[0]])
    timing.print_table(
        f"Data resume: first batch after start_batch ({len(urls)} shards, {per_epoch:,} samples, batch {args.batch},"
        f" shuffle_shards {args.shuffle_shards})",
        ["start batch", "epoch", "seconds", "MB read", "replaying instead (estimate)"],
        [
            (
                f"{r['start_batch']:,}",
                r["epoch"],
                timing.fmt_range(stats[r["start_batch"]], 3),
                "n/a" if r["bytes_read"] is None else f"{r['bytes_read'] / 1e6:.1f}",
                f"{r['replay_estimate_seconds']:,.1f} s",
            )
            for r in rows
        ],
        caption=f"time ratio batch 10^6 / batch 10: {timing.fmt_range(ratio)};"
        f" one shard is {shard_bytes / 1e6:.1f} MB; reading runs at {rate:,.0f} samples/s",
    )
    payload = {
        "benchmark": "data_resume",
        "machine": timing.machine_info("cpu"),
        "dataset": {"shards": len(urls), "samples": per_epoch, "shard_bytes": shard_bytes},
        "batch": args.batch,
        "shuffle_shards": args.shuffle_shards,
        "read_samples_per_second": rate,
        "rows": rows,
        "ratio_1e6_to_10": ratio.to_dict(),
    }
    timing.log(f"wrote {timing.write_json('data_resume', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
