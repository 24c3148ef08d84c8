"""Optuna studies of guidance settings: search spaces, the driver and the report.

- ``config``: typed schema of ``sweeps/<study>.yaml`` and ``load_study`` (Hydra compose + validation);
- ``space``: search space -> Optuna distributions, sampled parameters -> guidance settings, samplers;
- ``storage``: journal/RDB storage, heartbeats, stale trials, budget;
- ``resources``: the evaluator (checkpoint, extractor, reference statistics) and the MLflow runs;
- ``driver``: workers, the ask/tell loop, re-evaluation of the Pareto set (``python -m sgexp.sweep``);
- ``progress``: the live table and the final Pareto table;
- ``report``: Pareto plots, hypervolume, heatmaps, ``summary.json``.
"""
