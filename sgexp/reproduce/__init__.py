"""The reproduction pipeline behind ``make reproduce`` and ``docs/results.md``.

    python -m sgexp.reproduce                      # preset "full": MNIST-5k, ~1 h on 2 quiet CPU cores
    python -m sgexp.reproduce --preset smoke ...   # the same pipeline in seconds (digits, tiny model)
    python -m sgexp.reproduce --report-only        # rewrite docs/results.md from the finished stages

One resumable run of the project's own entry points (``sgexp.train``, ``sgexp.evaluate``,
``sgexp.sweep``), cut into stages that each run in their own process and leave a marker when they
finish; re-running the command skips finished stages and resumes an interrupted training from its
``last.ckpt``. What every stage runs is fixed by a preset (``plan.PRESETS``) before any result is
seen: budgets are step and sample counts, never wall time, so a busy machine makes the run slower
but not different.

- ``plan``: presets and the stages they expand to (commands, dependencies, outputs).
- ``runner``: runs the stages, at most ``jobs`` at a time, each with one torch thread.
- ``results``: reads the stages' outputs into one record of numbers.
- ``figures`` and ``report``: the PNGs and ``docs/results.md``, including which of the paper's
  claims hold at this scale.
"""
