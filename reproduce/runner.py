"""Run the stages in order: resumable, at most ``jobs`` at a time, one torch thread each.

A stage that finished leaves ``<work>/stages/<name>.json`` (its command, attempts and seconds) and
is skipped from then on. When a stage fails, the stages that need it are not started, all others
still run (their work is kept for the next attempt), and the run ends raising with the failed
stages' logs. Each subprocess gets one intra-op thread: on 2 cores shared with other jobs, two
torch threads per process spin-wait and run many times slower than one, so two one-thread stages
side by side use the machine best.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from reproduce.stages import ROOT, Stage, rel
from sgexp.checks import check_positive_int, fail
from sgexp.runs import checkpoint_step

log = logging.getLogger("reproduce")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# --inline calls what `python -m ENTRY` calls, in this process: Hydra apps are composed from their
# config (as @hydra.main would) and handed to run(cfg); the other entry points are argparse CLIs.
HYDRA_APPS = {"sgexp.train": "train", "sgexp.evaluate": "evaluate"}
CLI_MAINS = {"sgexp.data": "sgexp.data.__main__", "sgexp.sweeps": "sgexp.sweeps.cli"}


def marker(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def is_done(state_dir: Path, name: str) -> bool:
    return marker(state_dir, name).is_file()


def incomplete(stage: Stage) -> str | None:
    """Why the stage's work is not complete (its output is missing or, for a training, at another
    step), or None when it is. Lightning exits 0 when SIGTERM stops it early: the exit status alone
    cannot tell."""
    if stage.output is None:
        return None
    if not stage.output.is_file():
        return f"no {stage.output}"
    if stage.step is not None and (step := checkpoint_step(stage.output)) != stage.step:
        return f"stopped at step {step} of {stage.step}"
    return None


def run_inline(stage: Stage) -> None:
    """Run the stage's entry point in this process: the same function and arguments without a new
    interpreter (seconds of imports per stage; what the smoke test uses). Imported here: the
    subprocess runner never needs Lightning or Hydra."""
    if stage.entry in HYDRA_APPS:
        from hydra import compose, initialize_config_dir

        from sgexp.config import register_configs

        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose(HYDRA_APPS[stage.entry], overrides=list(stage.args))
        importlib.import_module(stage.entry).run(cfg)
    elif stage.entry in CLI_MAINS:
        importlib.import_module(CLI_MAINS[stage.entry]).main(list(stage.args))
    else:
        raise fail(f"stages[{stage.name}].entry", stage.entry, f"inline runs one of {[*HYDRA_APPS, *CLI_MAINS]}")


def _record(state_dir: Path, stage: Stage, seconds: float, returncode: int, failure: str | None = None) -> dict:
    """Append this attempt to ``<name>.attempts.json``; a successful one (exit status 0, output
    complete) also writes the stage's marker. ``record["failure"]`` says why an attempt failed."""
    path = state_dir / f"{stage.name}.attempts.json"
    attempts = json.loads(path.read_text()) if path.is_file() else []
    failure = failure or (f"exit status {returncode}" if returncode != 0 else incomplete(stage))
    finished = datetime.now().isoformat(timespec="seconds")
    attempts.append({"finished": finished, "seconds": seconds, "rc": returncode, "failure": failure})
    path.write_text(json.dumps(attempts, indent=2))
    record = {"stage": stage.name, "command": stage.shell(), "attempts": attempts, "failure": failure}
    record["seconds"] = sum(a["seconds"] for a in attempts)
    if failure is None:
        marker(state_dir, stage.name).write_text(json.dumps(record, indent=2))
    return record


def check_plan(stages: Sequence[Stage]) -> None:
    names = [s.name for s in stages]
    for i, stage in enumerate(stages):
        unknown = [n for n in stage.needs if n not in names[:i]]
        if unknown:
            raise fail(f"stages[{stage.name}].needs", list(stage.needs), f"{unknown} are not earlier stages")


@contextlib.contextmanager
def _stop_children_on_exit(running: dict, state_dir: Path):
    """Whatever ends the runner, its children end first, each with its checkpoint saved (a training
    answers SIGTERM by saving one) and its attempt recorded: an orphaned training would still hold its
    run directory when the command is re-run. Ctrl-C reaches the children by itself; ``kill PID``
    reaches only this process, hence the SIGTERM handler."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except BaseException:
        for stage, proc, _ in running.values():
            log.warning("stopping %s (pid %d); re-run the command to resume", stage.name, proc.pid)
            proc.terminate()
        for stage, proc, start in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            # Never a success, whatever the exit status: a sweep may have written a partial summary.
            _record(state_dir, stage, time.monotonic() - start, proc.wait(), failure="interrupted")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stages(
    stages: Sequence[Stage], state_dir: Path, log_dir: Path, jobs: int = 2, inline: bool = False
) -> list[str]:
    """Run every stage without a marker, in list order as their dependencies finish; returns the names
    of the stages run now. ``inline`` runs each in this process, one after the other (``run_inline``)."""
    check_positive_int("jobs", jobs)
    check_plan(stages)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:  # a cache made earlier, by this pipeline or by hand, is kept as it is
        if stage.cached and not is_done(state_dir, stage.name) and incomplete(stage) is None:
            kept = {"stage": stage.name, "command": stage.shell(), "attempts": [], "seconds": 0.0, "kept": True}
            marker(state_dir, stage.name).write_text(json.dumps(kept, indent=2))
    done = {s.name for s in stages if is_done(state_dir, s.name)}
    for stage in stages:
        if stage.name in done:
            log.info("skip %s (finished: %s)", stage.name, rel(marker(state_dir, stage.name)))
    todo = [s for s in stages if s.name not in done]
    total, ran, failed, lost = len(todo), [], [], set()  # lost: failed, or needing a lost stage
    running: dict[str, tuple[Stage, subprocess.Popen, float]] = {}
    env = {**os.environ, **THREAD_ENV}

    def finish(stage: Stage, start: float, returncode: int) -> None:
        record = _record(state_dir, stage, time.monotonic() - start, returncode)
        if record["failure"] is None:
            done.add(stage.name)
            ran.append(stage.name)
            log.info(
                "done %s in %.0f s (%d of %d stages)", stage.name, record["attempts"][-1]["seconds"], len(ran), total
            )
        else:
            log.error("%s failed (%s): see %s", stage.name, record["failure"], rel(log_dir / f"{stage.name}.log"))
            failed.append(stage.name)
            lost.add(stage.name)

    with _stop_children_on_exit(running, state_dir):
        while todo or running:
            for stage in list(todo):
                if lost.intersection(stage.needs):  # its inputs will not exist; the others go on
                    todo.remove(stage)
                    lost.add(stage.name)
                elif len(running) < jobs and done.issuperset(stage.needs):
                    todo.remove(stage)
                    log.info("[%d/%d] %s: %s", total - len(todo), total, stage.name, stage.shell())
                    start = time.monotonic()
                    if inline:
                        with contextlib.chdir(ROOT):  # the commands' relative paths are the repository's
                            run_inline(stage)
                        finish(stage, start, 0)
                        continue
                    with (log_dir / f"{stage.name}.log").open("a") as out:
                        out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {stage.shell()}\n")
                        out.flush()
                        proc = subprocess.Popen(stage.command(), cwd=ROOT, env=env, stdout=out, stderr=out)
                    running[stage.name] = (stage, proc, start)
            for name, (stage, proc, start) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    finish(stage, start, proc.returncode)
            if running:
                time.sleep(0.5)
    if failed:
        logs = ", ".join(rel(log_dir / f"{n}.log") for n in failed)
        waiting = sorted(lost - set(failed))
        waiting = f"; {waiting} wait for them" if waiting else ""
        raise RuntimeError(f"stages {failed} failed (see {logs}){waiting}; fix and re-run the same command to resume")
    return ran
