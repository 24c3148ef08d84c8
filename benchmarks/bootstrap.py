"""Bootstrap intervals: seconds that ``sgexp.evaluate`` adds for ``bootstrap=1000`` at 1k and 50k samples.

Synthetic Gaussian features (2048-d, as Inception's pool3) against the statistics of a Gaussian
reference; setting b is setting a plus a little noise (the same sample indices). Timed once each,
after the reference's covariance root is computed (once per evaluation, reported on its own line):

* ``fid_interval`` of one setting;
* ``compare_settings`` of two settings: both FID intervals and their paired interval (the pair itself
  costs nothing more: the replicates of both settings come from the same draws);
* ``precision_replicates`` of one setting (one more k-NN pass over the samples and the reference
  subset: what precision itself costs), at the sizes listed in ``--precision-sizes``.

The default (linearised) path is timed; ``--method exact`` times one eigenproblem per draw instead.
numpy's BLAS uses its default thread count.

    python -m benchmarks.bootstrap        # 1k and 50k samples of 2048-d features (~8 min on 2 slow cores)
    python -m benchmarks.bootstrap --sizes 1000 --dim 128 --precision-sizes 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from benchmarks import timing
from sgexp.eval.bootstrap import _reference_root, choose_method, compare_settings, fid_interval, precision_replicates
from sgexp.eval.metrics import ReferenceStats

REFERENCE_FEATURES = 10000  # as many raw reference features as ``reference_stats`` keeps by default


def gaussian_reference(dim: int, seed: int = 0) -> ReferenceStats:
    """Mean and covariance of 2·dim (at least 4096) Gaussian features with a decaying spectrum, and
    a raw subset for precision."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim) / 64.0)
    real = (rng.standard_normal((max(2 * dim, 4096), dim)) * scales).astype(np.float32)
    subset = (rng.standard_normal((REFERENCE_FEATURES, dim)) * scales).astype(np.float32)
    return ReferenceStats(real.mean(0, dtype=np.float64), np.cov(real, rowvar=False), subset, len(real), "gauss", "")


def seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bootstrap", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,50000", help="sample counts, comma-separated")
    ap.add_argument("--dim", type=int, default=2048, help="feature dimension (Inception pool3: 2048)")
    ap.add_argument("--n-boot", type=int, default=1000, help="redraws (sgexp.evaluate's bootstrap=)")
    ap.add_argument("--precision-sizes", default="1000", help="sizes at which the precision interval is timed")
    ap.add_argument("--method", default="auto", help="auto (linear) or exact")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with_precision = {int(s) for s in args.precision_sizes.split(",") if s}
    ref = gaussian_reference(args.dim)
    root_seconds = seconds(_reference_root, ref.sigma)
    rows = []
    for n in sizes:
        rng = np.random.default_rng(n)
        scales = 1.1 / np.sqrt(1.0 + np.arange(args.dim) / 64.0)
        a = (rng.standard_normal((n, args.dim)) * scales + 0.05).astype(np.float32)
        b = a + 0.05 * rng.standard_normal(a.shape).astype(np.float32)
        fids = {"a": {"fid": 0.0}, "b": {"fid": 0.0}}  # point values only place the intervals: not timed here
        row = {
            "samples": n,
            "dim": args.dim,
            "n_boot": args.n_boot,
            "method": choose_method(n, args.dim, args.n_boot, args.method),
        }
        row["fid_interval_seconds"] = seconds(fid_interval, a, ref, args.n_boot, 0.95, 0, args.method)
        row["two_settings_and_pair_seconds"] = seconds(
            compare_settings, {"a": {"fid": a}, "b": {"fid": b}}, fids, ref, args.n_boot, 0.95, 0, args.method
        )
        if n in with_precision:
            row["precision_interval_seconds"] = seconds(precision_replicates, a, ref, args.n_boot)
        rows.append(row)
        timing.log(f"bootstrap: {row}")
    timing.print_table(
        f"Bootstrap intervals, {args.n_boot} redraws of {args.dim}-d features (seconds)",
        ["samples", "path", "FID interval", "2 settings + paired", "precision interval"],
        [
            (
                f"{r['samples']:,}",
                r["method"],
                f"{r['fid_interval_seconds']:.1f}",
                f"{r['two_settings_and_pair_seconds']:.1f}",
                f"{r['precision_interval_seconds']:.1f}" if "precision_interval_seconds" in r else "-",
            )
            for r in rows
        ],
        caption=f"plus {root_seconds:.1f} s once per evaluation for the reference covariance root",
    )
    payload = {
        "benchmark": "bootstrap",
        "machine": timing.machine_info("cpu"),
        "reference_root_seconds": root_seconds,
        "rows": rows,
    }
    timing.log(f"wrote {timing.write_json('bootstrap', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
