"""The study's storage and the protocol every worker follows on it: heartbeats, stale trials, budget.

Storage: an Optuna ``JournalStorage`` on a file (``runs/optuna/<study>.log`` by default; the O_EXCL
``JournalFileOpenLock`` works on NFS v3+, no server) or any RDB URL (``sqlite:///...``, ``postgresql://...``).
A journal line cut by a killed writer is moved into ``<journal>.corrupt`` under the journal's lock, when
the storage is opened and before every append; an unreadable line in the middle is an error naming the
file and the line (``sgexp.sweeps.journal``).

Heartbeat: JournalStorage has no Optuna heartbeat, so (for every storage alike) a daemon thread per running
trial writes ``time.time()`` to the trial's user attribute ``heartbeat`` every ``heartbeat.interval``
seconds. Before asking, a worker fails every RUNNING trial silent for ``heartbeat.timeout`` seconds
("worker died (stale heartbeat)", attribute ``requeued``) and enqueues its parameters again with
``retry_of`` (the dead trial's number) and ``retries`` (how many times the chain has been retried). Only
the worker whose FAIL is recorded first enqueues (the storage refuses to finish a trial twice), so a dead
trial is retried once per death. A trial that has already been retried ``optuna.max_retries`` times is not
retried again when its worker dies: it is a counted FAIL ("worker died (stale heartbeat) N times;
max_retries=M"), so a setting that kills its worker (out of memory) cannot kill every worker in turn. A
trial handed back by a stopped worker (Ctrl-C) is enqueued again without using a retry. Worker clocks must
agree to well within the timeout (NTP).

Budget: COMPLETE and FAIL trials count toward ``n_trials`` (requeued FAILs do not: they run again), and so
do RUNNING ones, so K workers overshoot by at most K-1. A waiting retry runs even when the budget is met
meanwhile (it replaces a lost trial), and workers leave only when no trial is running.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from omegaconf import DictConfig
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from sgexp.checks import fail
from sgexp.sweeps.journal import RepairingLock, check_journal

log = logging.getLogger("sgexp.sweeps.storage")

HEARTBEAT = "heartbeat"
STALE = "worker died (stale heartbeat)"
INTERRUPTED = "interrupted (the worker was stopped)"
REQUEUE_ATTRS = ("family", "baseline", "setting", "in_space")
RETRIES = "retries"  # user attr: how many times this trial's chain was retried after its worker died


# --------------------------------------------------------------------------- storage


def default_storage(cfg: DictConfig) -> str:
    return str(Path(cfg.paths.runs_dir).resolve() / "optuna" / f"{cfg.name}.log")


def open_storage(url: str) -> BaseStorage:
    """A journal file path, or an RDB URL (``sqlite:///...``, ``postgresql+psycopg2://...``); fails now if
    unusable, with an error that names the URL without its password."""
    if "://" in url:
        try:
            if url.startswith("sqlite:///") and url[len("sqlite:///") :] not in ("", ":memory:"):
                Path(url[len("sqlite:///") :].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.RDBStorage(url)
        except Exception as err:  # sqlalchemy: unknown dialect, missing driver, unreachable server, bad path
            raise fail(
                "storage", shown_url(url), f"cannot open this database URL ({database_error(err, url)})"
            ) from None
    path = Path(url).expanduser().resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise PermissionError(f"{path} is not writable")
        check_journal(path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=RepairingLock(str(path))))
    except OSError as err:
        raise fail("storage", url, f"cannot open the journal file ({type(err).__name__}: {err})") from None


def shown_url(url: str) -> str:
    """A storage URL as it may be printed or logged: a database password as ``***`` (a journal path as is)."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url  # optuna's RDB storage depends on it

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: only its scheme
        return url.split("://", 1)[0] + "://..."


def database_error(err: Exception, url: str) -> str:
    """What went wrong opening an RDB URL, in one line without the password: SQLAlchemy's first line (a
    server's own message: refused connection, failed authentication, unknown database), or the driver that
    is not installed. Optuna turns a missing driver into an ImportError; its cause names the module."""
    cause = err.__cause__ or err.__context__
    if isinstance(err, ImportError) and isinstance(cause, ModuleNotFoundError):
        return (
            f"its database driver is not installed (No module named {cause.name!r}); PostgreSQL: "
            "pip install psycopg2-binary and write postgresql+psycopg2://... (plain postgresql:// wants psycopg 3)"
        )
    first_line = (str(err).strip().splitlines() or [""])[0]
    text = f"{type(err).__name__}: {first_line}".replace(url, shown_url(url))
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(password, "***") if password else text


@contextmanager
def setup_lock(url: str) -> Iterator[None]:
    """Held while a command creates or resumes the study (attributes, MLflow parent run, baselines), so two
    commands started at the same instant on a new study do not both enqueue the baselines or open two parent
    runs. A journal gets ``<journal>.setup.lock`` (Optuna's O_EXCL file lock; a holder dead for its grace
    period is broken); an RDB URL has no such lock: start the first command alone there."""
    if "://" in url:
        yield
        return
    lock = JournalFileOpenLock(f"{Path(url).expanduser().resolve()}.setup")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- heartbeat and budget


class Heartbeat:
    """Writes ``time.time()`` to a running trial's ``heartbeat`` attribute every ``interval`` s (daemon thread)."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sgexp-heartbeat-{trial_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_user_attr(self.trial_id, HEARTBEAT, time.time())
            except UpdateFinishedTrialError:
                return  # finished (by this worker, or failed as stale by another)
            except Exception as err:  # a storage hiccup must not kill the trial; the next beat retries
                log.warning("heartbeat of trial id %d failed: %s", self.trial_id, err)


def last_beat(trial: FrozenTrial) -> float:
    """When a running trial last showed life: its heartbeat, or its start before the first beat."""
    started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
    return max(float(trial.user_attrs.get(HEARTBEAT, 0.0)), started)


def dead_worker_reason(trial: FrozenTrial, max_retries: int) -> str | None:
    """Why a trial whose worker died is not retried again (it used its retries); None if it may be."""
    retries = int(trial.user_attrs.get(RETRIES, 0))
    if retries < max_retries:
        return None
    return f"{STALE} {retries + 1} times; max_retries={max_retries}"


def release(study: optuna.Study, trial: FrozenTrial, reason: str, max_retries: int | None = None) -> str | None:
    """Fail a RUNNING trial and, unless it used its retries, enqueue its parameters again.

    ``max_retries`` None: the trial was handed back (Ctrl-C), not lost; it is enqueued again without using
    a retry. Otherwise its worker died: the retry gets ``retries`` + 1, and a trial already retried
    ``max_retries`` times becomes a counted FAIL instead. Returns the recorded ``fail_reason``, or None if
    the trial was already finished. The FAIL is the claim: the storage refuses to finish a trial twice, so
    of several workers releasing the same trial only one enqueues it.
    """
    final = None if max_retries is None else dead_worker_reason(trial, max_retries)
    retries = int(trial.user_attrs.get(RETRIES, 0))
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", final or reason)
        study._storage.set_trial_user_attr(trial._trial_id, RETRIES, retries)
        if final is None:
            study._storage.set_trial_user_attr(trial._trial_id, "requeued", True)
        study.tell(trial.number, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, ValueError):  # ValueError: "Cannot tell a FAIL trial"
        return None
    if final is not None:
        log.error("trial %d: %s: recorded as FAIL, not retried again", trial.number, final)
        return final
    attrs = {k: trial.user_attrs[k] for k in REQUEUE_ATTRS if k in trial.user_attrs}
    attrs.update(retry_of=trial.number, **{RETRIES: retries + (max_retries is not None)})
    study.enqueue_trial(dict(trial.params), user_attrs=attrs)
    log.warning("trial %d: %s; its parameters are enqueued again (retries: %d)", trial.number, reason, attrs[RETRIES])
    return reason


def reap_stale(study: optuna.Study, timeout: float, max_retries: int = 1) -> list[tuple[FrozenTrial, str]]:
    """Release every RUNNING trial without a heartbeat for ``timeout`` seconds: (trial, fail_reason) of each."""
    now = time.time()
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if now - last_beat(t) > timeout]
    released = [(t, release(study, t, STALE, max_retries)) for t in stale]
    return [(t, reason) for t, reason in released if reason is not None]


def is_counted_fail(trial: FrozenTrial) -> bool:
    """A FAIL of the trial itself; a requeued FAIL (dead worker) is not: its parameters run again."""
    return trial.state == TrialState.FAIL and not trial.user_attrs.get("requeued", False)


def counts(study: optuna.Study) -> dict[str, int]:
    """``done`` (COMPLETE + FAIL, requeued FAILs excluded: they run again), ``running``, ``waiting`` (of which
    ``retries_waiting`` are retries), ``complete``."""
    trials = study.get_trials(deepcopy=False)
    return {
        "done": sum(t.state == TrialState.COMPLETE or is_counted_fail(t) for t in trials),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "waiting": sum(t.state == TrialState.WAITING for t in trials),
        "retries_waiting": sum(t.state == TrialState.WAITING and "retry_of" in t.user_attrs for t in trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
    }
