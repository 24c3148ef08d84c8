"""Optuna studies of guidance settings: search spaces, the driver and the report.

``python -m sgexp.sweeps --study NAME`` (``cli``) runs the study ``sweeps/NAME.yaml``.

- ``study``: typed schema of ``sweeps/<study>.yaml`` and ``load_study`` (Hydra compose + validation);
- ``space``: search space -> Optuna distributions, sampled parameters -> guidance settings, samplers;
- ``storage`` (and ``journal``): journal/RDB storage, heartbeats, stale trials, budget;
- ``tracker``: the study's MLflow parent run and one child run per trial;
- ``driver``: workers, the ask/tell loop, the study from start to report;
- ``fidelity``: re-evaluation of the finalists on more samples, paired intervals between them;
- ``array``: workers as a SLURM job array;
- ``progress``: the live view (trials, Pareto set, the running pass with samples/s and the study's ETA) and the
  final Pareto table;
- ``report`` (and ``plots``): Pareto plots, hypervolume, heatmaps, ``summary.json``;
- ``dashboard``: a stored study in optuna-dashboard (``python -m sgexp.sweeps dashboard``).
"""
