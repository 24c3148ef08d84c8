"""Throughput and FLOPs-ratio benchmarks (``make bench``; ``benchmarks/gpu.sh`` on a GPU).

Run from the repository root: ``python -m benchmarks.run_all`` or one script,
e.g. ``python -m benchmarks.train_step --help``. Results go to
``benchmarks/results/<name>.json`` (or ``$OUT``/``--out``).
"""
