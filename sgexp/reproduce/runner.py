"""Run the stages of a plan: resumable, at most ``jobs`` at a time, one torch thread each.

A finished stage leaves ``<work>/stages/<name>.json`` (its command, attempts and seconds) and is
skipped from then on; when a stage fails, the stages that need it are not started, all others
still run (their work is kept for the next attempt), and the run ends raising with the failed
stages' logs. Each subprocess gets one intra-op thread:
on 2 cores shared with other jobs, two torch threads per process spin-wait and run many times
slower than one, so two one-thread stages side by side use the machine best.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from sgexp.checks import fail
from sgexp.reproduce.plan import ROOT, Stage

log = logging.getLogger("sgexp.reproduce")
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def prepare_dataset(name: str, data_dir: Path, classifier_epochs: int) -> Path:
    """The dataset's shards, its domain-FID classifier and reference statistics, made once, here:
    stages that run side by side would otherwise race to write the same cache files."""
    from sgexp.data import ensure_prepared
    from sgexp.eval import build_extractor, reference_stats
    from sgexp.eval.classifier import train_classifier

    dataset_dir = ensure_prepared(name, data_dir)
    if not (dataset_dir / "classifier.pt").is_file():
        log.info("training the %s classifier for domain FID (%d epochs)", name, classifier_epochs)
        train_classifier(dataset_dir, epochs=classifier_epochs)
    reference_stats(build_extractor("classifier", dataset_dir), dataset_dir, "val")
    return dataset_dir


def run_inline(argv: Sequence[str]) -> None:
    """Run a stage's ``python -m MODULE ARGS`` command in this process: the same entry point and
    arguments without a new interpreter (seconds of imports per stage; what the smoke test uses)."""
    if len(argv) < 3 or argv[1] != "-m":
        raise fail("command", list(argv), "an inline stage must be `python -m MODULE ARGS...`")
    module, args = argv[2], list(argv[3:])
    if module == "sgexp.sweep":
        from sgexp import sweep

        sweep.main(args)
        return
    if module not in ("sgexp.train", "sgexp.evaluate"):
        raise fail("command", list(argv), "inline stages run sgexp.train, sgexp.evaluate or sgexp.sweep")
    from hydra import compose, initialize_config_dir

    from sgexp.config import register_configs

    register_configs()
    name = module.split(".")[1]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(name, overrides=args)
    if name == "train":
        from sgexp.train import run
    else:
        from sgexp.evaluate import run
    run(cfg)


def marker(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.json"


def is_done(state_dir: Path, name: str) -> bool:
    return marker(state_dir, name).is_file()


def _record(state_dir: Path, stage: Stage, seconds: float, returncode: int) -> dict:
    """Append this attempt; a successful one (exit status 0 and ``stage.incomplete()`` None) also
    writes the stage's marker. ``record["failure"]`` says why an attempt did not succeed."""
    path = state_dir / f"{stage.name}.attempts.json"
    attempts = json.loads(path.read_text()) if path.is_file() else []
    failure = f"exit status {returncode}" if returncode != 0 else stage.incomplete()
    attempt = {"finished": datetime.now().isoformat(timespec="seconds"), "seconds": seconds, "rc": returncode}
    attempts.append({**attempt, "failure": failure})
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


def run_stages(
    stages: Sequence[Stage], state_dir: Path, log_dir: Path, jobs: int = 2, inline: bool = False
) -> list[str]:
    """Run every stage without a marker; returns the names of the stages run now. ``inline`` runs
    each command in this process, one after the other (``run_inline``)."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise fail("jobs", jobs, "must be an integer >= 1")
    check_plan(stages)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    done = {s.name for s in stages if is_done(state_dir, s.name)}
    for name in (s.name for s in stages if s.name in done):
        log.info("skip %s (finished: %s)", name, marker(state_dir, name))
    pending = [s for s in stages if s.name not in done]
    running: dict[str, tuple[subprocess.Popen, float, Stage]] = {}
    failed: list[str] = []
    blocked: list[str] = []  # stages that need a failed one
    ran: list[str] = []
    env = {**os.environ, **THREAD_ENV}

    def stop(signum, frame):  # SIGTERM (kill PID): end the children too, then exit like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while pending or running:
            for stage in list(pending):
                if any(n in failed or n in blocked for n in stage.needs):
                    pending.remove(stage)  # its inputs will not exist; stages that do not need them go on
                    blocked.append(stage.name)
                    continue
                if len(running) >= jobs:
                    break
                if not all(n in done for n in stage.needs):
                    continue
                pending.remove(stage)
                if stage.action is not None or inline:
                    log.info("run %s: %s", stage.name, stage.shell())
                    start = time.monotonic()
                    stage.action() if stage.action is not None else run_inline(stage.command())
                    record = _record(state_dir, stage, time.monotonic() - start, 0)
                    if record["failure"] is not None:
                        raise RuntimeError(f"stage {stage.name} returned but is incomplete: {record['failure']}")
                    done.add(stage.name)
                    ran.append(stage.name)
                    continue
                path = log_dir / f"{stage.name}.log"
                log.info("start %s (log %s): %s", stage.name, path, stage.shell())
                with path.open("a") as out:
                    out.write(f"\n=== {datetime.now().isoformat(timespec='seconds')} {stage.shell()}\n")
                    out.flush()
                    proc = subprocess.Popen(stage.command(), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
                running[stage.name] = (proc, time.monotonic(), stage)
            for name, (proc, start, stage) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[name]
                record = _record(state_dir, stage, time.monotonic() - start, proc.returncode)
                if record["failure"] is None:
                    log.info("done %s in %.0f s", name, record["attempts"][-1]["seconds"])
                    done.add(name)
                    ran.append(name)
                else:
                    log.error("%s failed (%s): see %s", name, record["failure"], log_dir / f"{name}.log")
                    failed.append(name)
            settled = done | set(failed) | set(blocked)  # a stage needing a failed one is dropped next round
            if pending and not running and not any(all(n in settled for n in s.needs) for s in pending):
                raise RuntimeError(f"stages {[s.name for s in pending]} wait for stages that never finish")
            time.sleep(0.5)
    except BaseException:
        for name, (proc, _, _stage) in running.items():
            log.warning("stopping %s (pid %d); re-run the command to resume", name, proc.pid)
            proc.terminate()
        for proc, start, stage in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            # Never a success, whatever the exit status (Lightning exits 0 on SIGTERM): no marker.
            _record(state_dir, stage, time.monotonic() - start, -signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed:
        logs = ", ".join(str(log_dir / f"{n}.log") for n in failed)
        waiting = f"; {blocked} wait for them" if blocked else ""
        raise RuntimeError(f"stages {failed} failed (see {logs}){waiting}; fix and re-run the same command to resume")
    return ran
