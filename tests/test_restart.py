"""Restart safety with real processes and real files: atomic checkpoints, one rule for where a run continues,
one writer per run directory, stop on signals, clear errors (sgexp.runs, sgexp.lit.stop, sgexp.train)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_saver
import pytest
import torch
from conftest import ROOT, compose_train, digits_run
from mlflow.tracking import MlflowClient

from sgexp import runs
from sgexp.config import GuidedEvalConfig
from sgexp.eval.evaluator import find_checkpoint
from sgexp.lit.checkpointing import checkpoint_callbacks
from sgexp.lit.eval_callback import GuidedSamplingEval
from sgexp.train import build_trainer, run

# --------------------------------------------------------------------------- atomic saves under SIGKILL


def test_sigkill_at_random_moments_of_saves_always_leaves_a_loadable_newest_checkpoint(tmp_path):
    # forkserver: each saver is a fresh process forked from a server that imported torch once (fast), not
    # from this process (whose thread pools a fork would copy in an unknown state)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "sgexp.runs", "checkpoint_saver"])
    rng = random.Random(0)
    steps, partial_files = [], 0
    for _ in range(20):
        started = context.Queue()
        child = context.Process(target=checkpoint_saver.save_forever, args=(tmp_path, started), daemon=True)
        child.start()
        assert started.get(timeout=60) == (steps[-1] + 1 if steps else 0)  # resumed after the newest state
        time.sleep(rng.uniform(0.05, 0.5))
        os.kill(child.pid, signal.SIGKILL)  # no handler, no cleanup
        child.join()
        partial_files += len(list((tmp_path / "checkpoints").glob(".*.tmp-*")))  # killed mid-save
        newest = runs.newest_checkpoint(tmp_path)
        assert newest is not None
        state = torch.load(newest.path, map_location="cpu", weights_only=False)  # complete, really loadable
        assert state["global_step"] == newest.global_step and state["state_dict"]["w"][-1] == 2_999_999
        assert not steps or newest.global_step >= steps[-1]  # never went back
        steps.append(newest.global_step)
        runs.remove_partial_saves(tmp_path)
    assert steps[-1] > 0
    assert partial_files > 0, "no kill landed inside a save: the test did not test atomicity"


def test_a_later_step_is_never_overwritten_by_an_older_one(tmp_path):
    path = tmp_path / "last.ckpt"
    assert runs.atomic_save({"global_step": 7, "state_dict": {}}, path)
    assert not runs.atomic_save({"global_step": 5, "state_dict": {}}, path)
    assert runs.checkpoint_step(path) == 7


def test_newest_checkpoint_is_by_stored_step_and_skips_damaged_files(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    runs.atomic_save({"global_step": 4, "state_dict": {}}, ckpts / "step-0000004.ckpt")
    runs.atomic_save({"global_step": 6, "state_dict": {}}, tmp_path / "hpc_ckpt_1.ckpt")
    runs.atomic_save({"global_step": 8, "state_dict": {"w": torch.zeros(1000)}}, ckpts / "last.ckpt")
    os.utime(tmp_path / "hpc_ckpt_1.ckpt", (time.time() + 100, time.time() + 100))  # newest by time: not used
    assert runs.newest_checkpoint(tmp_path).path == ckpts / "last.ckpt"

    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])  # cut by a copy or a dying disk
    newest = runs.newest_checkpoint(tmp_path)
    assert newest.path == tmp_path / "hpc_ckpt_1.ckpt" and newest.global_step == 6
    assert "last.ckpt" in caplog.text and "skipping unusable checkpoint" in caplog.text


# --------------------------------------------------------------------------- training: rules and errors


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the restarted run diverged from the uninterrupted one"


STEPS = 60  # long enough that a signal sent after the first progress line lands mid-run


def base(tmp: Path, shards: Path, *extra: str) -> list[str]:
    """The digits run of conftest, 60 steps, validation and kept checkpoints every 30."""
    every = ("trainer.val_every_n_steps=30", "callbacks.checkpoint.every_n_steps=30")
    return digits_run(tmp, shards, f"trainer.max_steps={STEPS}", *every, "callbacks.monitor_every_n_steps=5", *extra)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards):
    """An uninterrupted run: the reference for every restart below."""
    tmp = tmp_path_factory.mktemp("straight")
    return run(compose_train(base(tmp, shards, f"paths.run_dir={tmp / 'run'}")))


def test_rerunning_the_same_command_continues_from_the_newest_checkpoint(tmp_path, shards, straight, monkeypatch):
    """Without resume=, inside and outside a SLURM job (no hpc checkpoint): no restart at step 0."""
    command = base(tmp_path, shards, f"paths.run_dir={tmp_path / 'run'}")
    first = run(compose_train([*command, "trainer.max_steps=20"]))
    assert first.global_step == 20
    slurm_job = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0"}
    slurm_job.update(SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost")
    for var, value in slurm_job.items():
        monkeypatch.setenv(var, value)  # a requeued job without an hpc checkpoint
    second = run(compose_train([*command, "trainer.max_steps=45"]))
    assert second.global_step == 45
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_NTASKS")
    third = run(compose_train(command))
    assert third.global_step == STEPS and first.mlflow_run_id == second.mlflow_run_id == third.mlflow_run_id
    _same_weights(third.checkpoint, straight.checkpoint)
    history = MlflowClient(third.tracking_uri).get_metric_history(third.mlflow_run_id, "train/loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"duplicate steps in the MLflow run: {sorted(steps)}"


def test_resume_of_another_model_fails_in_one_line_and_leaves_config_yaml(tmp_path, shards, straight):
    config_before = (straight.run_dir / "config.yaml").read_text()
    cfg = compose_train(base(tmp_path, shards, f"resume={straight.run_dir}", "model.name=SiT-Micro/4"))
    with pytest.raises(ValueError) as err:
        run(cfg)
    message = str(err.value)
    assert "model.name: checkpoint 'SiT-Micro/2', config 'SiT-Micro/4'" in message
    assert len(message.splitlines()) == 1 and str(straight.run_dir) in message
    assert (straight.run_dir / "config.yaml").read_text() == config_before


def test_a_new_run_in_a_directory_of_another_config_fails_naming_the_keys(tmp_path, shards, straight):
    cfg = compose_train(base(tmp_path, shards, f"paths.run_dir={straight.run_dir}", "seed=3"))
    with pytest.raises(ValueError, match=r"paths.run_dir=.* is invalid: .*seed: checkpoint 0, config 3"):
        run(cfg)


@pytest.mark.parametrize("content", ["a text file\n", b"PK\x03\x04 cut"])
def test_unusable_resume_file_names_file_reason_and_the_other_checkpoints(tmp_path, shards, straight, content):
    run_dir = tmp_path / "copy"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-0000030.ckpt").write_bytes(
        (straight.run_dir / "checkpoints" / "step-0000030.ckpt").read_bytes()
    )
    bad = run_dir / "checkpoints" / "last.ckpt"
    bad.write_text(content) if isinstance(content, str) else bad.write_bytes(content)
    with pytest.raises(ValueError) as err:
        run(compose_train(base(tmp_path, shards, f"resume={bad}")))
    message = str(err.value)
    assert f"resume={str(bad)!r} is invalid" in message and "not a complete checkpoint" in message
    assert "step-0000030.ckpt" in message  # what the user can resume from instead


def test_resume_of_a_directory_without_checkpoints_fails_before_any_work(tmp_path, shards):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=rf"resume='{empty}' is invalid: no usable checkpoint"):
        run(compose_train(base(tmp_path, shards, f"resume={empty}")))
    assert not (empty / "config.yaml").exists() and not (empty / "mlflow_run_id").exists()


def test_resume_of_an_older_checkpoint_than_the_run_holds_is_refused(tmp_path, shards, straight):
    older = straight.run_dir / "checkpoints" / "step-0000030.ckpt"
    with pytest.raises(ValueError, match=rf"it holds step 30, but .*last.ckpt \(step {STEPS}\) is newer"):
        run(compose_train(base(tmp_path, shards, f"resume={older}")))


# --------------------------------------------------------------------------- real processes: lock and signals


def _train_process(tmp_path: Path, shards: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    overrides = base(tmp_path, shards, f"paths.run_dir={run_dir}", *extra)
    log = open(tmp_path / f"train-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "sgexp.train", *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the training ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_one_writer_per_run_directory_and_stale_locks_are_taken_over(tmp_path, shards, straight, caplog):
    run_dir = tmp_path / "run"
    first = _train_process(
        tmp_path, shards, run_dir, "trainer.max_steps=100000", "callbacks.checkpoint.last_every_n_steps=1"
    )
    try:
        last = run_dir / "checkpoints" / "last.ckpt"
        _wait_for(lambda: last.is_file() and runs.checkpoint_step(last) >= 2, "a checkpoint", first)
        holder = json.loads((run_dir / ".lock").read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        with pytest.raises(runs.RunDirectoryBusy, match=rf"in use by pid {first.pid} on {socket.gethostname()}"):
            run(compose_train(base(tmp_path, shards, f"paths.run_dir={run_dir}", "trainer.max_steps=100000")))
    finally:
        first.kill()  # SIGKILL: the lock stays behind, its holder dead
        first.wait()
    assert (run_dir / ".lock").is_file()
    reached = runs.newest_checkpoint(run_dir).global_step
    resumed = run(compose_train(base(tmp_path, shards, f"paths.run_dir={run_dir}", f"trainer.max_steps={reached + 2}")))
    assert f"taking over the lock of {run_dir}: pid {first.pid} is not running" in caplog.text
    assert resumed.global_step == reached + 2 and not (run_dir / ".lock").exists()  # released at the end


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM])  # same path
def test_ctrl_c_and_sigterm_save_at_the_next_step_and_the_same_command_continues(tmp_path, shards, straight, signum):
    run_dir = tmp_path / "run"
    process = _train_process(tmp_path, shards, run_dir, "callbacks.checkpoint.last_every_n_steps=1000")
    _wait_for(lambda: re.search(rf"step \d+/{STEPS}", _read(tmp_path)), "training", process)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    text = _read(tmp_path)
    stopped = re.search(rf"{signal.Signals(signum).name}: saving \S+last.ckpt at step (\d+)", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < STEPS and runs.newest_checkpoint(run_dir).global_step == step
    status = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        (run_dir / "mlflow_run_id").read_text().strip()
    )
    assert status.info.status == "KILLED"
    resumed = run(compose_train(base(tmp_path, shards, f"paths.run_dir={run_dir}")))
    assert resumed.global_step == STEPS
    _same_weights(resumed.checkpoint, straight.checkpoint)


def _read(tmp_path: Path) -> str:
    return "".join(p.read_text() for p in sorted(tmp_path.glob("train-*.log")))


@pytest.mark.slow  # ~30 s: a training process of its own
def test_a_failed_requeue_keeps_its_checkpoint_says_so_and_trains_on(tmp_path, shards, straight):
    """SIGUSR1 inside a SLURM job whose ``scontrol requeue`` cannot run: the hpc checkpoint stays, the log
    says what failed, training goes on to the end unchanged."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no scontrol on this PATH
    env.update(SLURM_JOB_ID="4243", SLURM_NTASKS="1", SLURM_JOB_NAME="train", SLURM_PROCID="0", SLURM_LOCALID="0")
    env.update(SLURM_NODEID="0", SLURM_NODELIST="localhost")
    log = open(tmp_path / "train-usr1.log", "w")
    overrides = base(tmp_path, shards, f"paths.run_dir={run_dir}")
    process = subprocess.Popen(
        [sys.executable, "-m", "sgexp.train", *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    _wait_for(lambda: re.search(rf"step \d+/{STEPS}", _read(tmp_path)), "training", process)
    process.send_signal(signal.SIGUSR1)
    assert process.wait(timeout=300) == 0
    text = _read(tmp_path)
    assert "scontrol requeue 4243 failed" in text and "hpc_ckpt_1.ckpt is kept" in text, text[-3000:]
    assert 0 < runs.checkpoint_step(run_dir / "hpc_ckpt_1.ckpt") < STEPS
    _same_weights(run_dir / "checkpoints" / "last.ckpt", straight.checkpoint)


def test_evaluate_names_an_unusable_checkpoint_file(tmp_path):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("not a checkpoint\n")
    with pytest.raises(
        ValueError, match=r"checkpoint=.*notes.ckpt' is invalid: .*notes.ckpt: not a complete checkpoint"
    ):
        find_checkpoint(str(notes), tmp_path, None)


def test_the_stop_signal_is_looked_at_before_evaluation_and_checkpoints_of_a_step(tmp_path, shards):
    """Lightning runs batch-end hooks in callback order: a signal is honoured before the (long) guided
    evaluation and the periodic checkpoints of the same step, so SLURM's grace time is not used up."""
    cfg = compose_train(base(tmp_path, shards))
    evaluation = GuidedSamplingEval(GuidedEvalConfig(settings={"none": {"rule": "none"}}), tmp_path)
    checkpoints = checkpoint_callbacks(cfg.callbacks.checkpoint, tmp_path / "run" / "checkpoints")
    trainer = build_trainer(cfg, tmp_path / "run", None, [*checkpoints, evaluation])
    order = [type(c).__name__ for c in trainer.callbacks]
    first = order.index("StopOnSignal")
    assert first < order.index("GuidedSamplingEval") and order.count("ModelCheckpoint") == 2
    assert all(first < i for i, name in enumerate(order) if name in ("ModelCheckpoint", "FinalCheckpoint"))


class LoaderDiesOnSigterm(torch.utils.data.IterableDataset):
    """What SLURM's SIGTERM does to a run with loader workers: the signal reaches the main process, and the
    next fetch fails because the worker handing over the batch died. Here at item ``fail_at``."""

    def __init__(self, fail_at: int):
        self.fail_at = fail_at

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for i in range(10_000):
            if i == self.fail_at:
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated.")
            yield torch.randn(3, 16, 16, generator=gen), torch.randint(5, (), generator=gen)


def test_sigterm_while_a_batch_is_fetched_saves_the_last_complete_step(tmp_path):
    """``StopOnSignal.on_exception``: the loader fails before any batch-end hook could see the signal, so
    rank zero saves the last complete step as last.ckpt; the loader's error is what the user sees."""
    import lightning

    from sgexp.config import OptimConfig
    from sgexp.lit.module import FlowMatchingModule
    from sgexp.lit.stop import StopOnSignal
    from sgexp.models import DiT, DiTConfig

    config = DiTConfig.from_name("SiT-Micro/4", input_size=16, in_channels=3, num_classes=5)
    module = FlowMatchingModule(DiT(config).config.to_dict(), OptimConfig(lr=1e-3))
    stop = StopOnSignal(tmp_path)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=50,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stop],
    )
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError, match="is killed by signal: Terminated"):
            trainer.fit(module, torch.utils.data.DataLoader(LoaderDiesOnSigterm(fail_at=3 * 8 + 5), batch_size=8))
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers found are back
    saved = tmp_path / "checkpoints" / "last.ckpt"
    # Lightning fetches one batch ahead: the 4th fetch fails while batch 2 waits, so steps 0 and 1 are complete
    assert runs.checkpoint_step(saved) == 2
    state = torch.load(saved, map_location="cpu", weights_only=False)
    weights = {k: v for k, v in state["state_dict"].items() if not k.startswith("ema.")}
    assert all(torch.equal(weights[k], v) for k, v in module.state_dict().items() if k in weights)
