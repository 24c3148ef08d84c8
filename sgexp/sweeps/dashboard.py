"""A stored study in optuna-dashboard: ``python -m sgexp.sweeps dashboard --study NAME [--storage URL]``.

optuna-dashboard (a dev extra: ``pip install -e '.[dev]'``) serves Optuna's own views of a study, its
history, Pareto front, parallel coordinates and parameter importances, labelled with the study's metric
names (``study.name_objectives``). It reads the study's storage, a journal file or an RDB URL, the same one
the sweep writes, so it can watch a running sweep. It listens on 127.0.0.1 only (from another machine:
``ssh -L 8080:127.0.0.1:8080 host``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna

from sgexp.checks import check_positive_int, fail
from sgexp.sweeps.storage import open_storage
from sgexp.sweeps.study import name_objectives

log = logging.getLogger("sgexp.sweeps.dashboard")

HOST = "127.0.0.1"


def load_stored_study(name: str, storage_url: str) -> tuple[optuna.storages.BaseStorage, optuna.Study]:
    """The storage and study ``name`` in it, with its metric names set; ``ValueError`` if either is missing."""
    if "://" not in storage_url and not Path(storage_url).expanduser().is_file():
        raise fail("storage", storage_url, "no such journal file (pass the study's --storage)")
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise fail("study", name, f"is not in {storage_url}, which holds {names}")
    study = optuna.load_study(study_name=name, storage=storage)
    name_objectives(study)  # a study stored before the sweeps named their metrics
    return storage, study


def serve(name: str, storage_url: str, port: int = 8080) -> None:
    """Run optuna-dashboard on ``storage_url`` at http://127.0.0.1:``port`` until Ctrl-C."""
    check_positive_int("port", port)
    if port > 65535:
        raise fail("port", port, "must be a TCP port, 1..65535")
    try:
        import optuna_dashboard
    except ImportError:
        raise fail("dashboard", "optuna-dashboard", "is not installed: pip install -e '.[dev]'") from None
    storage, study = load_stored_study(name, storage_url)
    log.info("study %s (%d trials) at http://%s:%d/dashboard/", name, len(study.trials), HOST, port)
    optuna_dashboard.run_server(storage, host=HOST, port=port)
