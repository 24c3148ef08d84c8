"""The reproduction pipeline behind ``make reproduce`` and ``docs/results.md``.

    python -m reproduce                      # preset "full": MNIST-5k, ~1 h on 2 quiet CPU cores
    python -m reproduce --preset smoke ...   # the same pipeline in seconds (digits, tiny model)
    python -m reproduce --report-only        # rewrite docs/results.md from the finished stages

Run from the repository root: this folder is not part of the installed ``sgexp`` package. One
resumable run of the project's own entry points (``sgexp.data``, ``sgexp.train``, ``sgexp.evaluate``,
``sgexp.sweeps``), cut into stages that each run in their own process and leave a marker when they
finish; re-running the command skips finished stages and resumes an interrupted training from its
``last.ckpt``. What every stage runs is fixed by a preset (``stages.PRESETS``) before any result is
seen: budgets are step and sample counts, never wall time, so a busy machine makes the run slower
but not different.

- ``stages``: presets and the plain list of stages they expand to (command, dependencies, output).
- ``runner``: runs the stages, at most ``jobs`` at a time, each with one torch thread.
- ``results``: reads the stages' outputs into one record of numbers.
- ``figures``, ``report`` and ``claims``: the PNGs and ``docs/results.md``, including which of the
  papers' claims hold; ``references``: the numbers quoted from the papers and benchmarks.
"""
