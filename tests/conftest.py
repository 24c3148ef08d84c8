"""Shared fixtures: small real models with non-trivial weights.

DiT's adaLN-Zero initialisation makes every block the identity and the output
zero, which would make most equalities hold trivially; the fixtures therefore
re-draw all weights from a seeded normal distribution.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from sgexp.config import register_configs
from sgexp.data import ensure_prepared
from sgexp.models import DiT, DiTConfig, Route

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def small_config(**overrides) -> DiTConfig:
    """8×8×3 input, patch 2 -> 16 tokens, depth 6, one route 1..3."""
    kwargs = dict(
        input_size=8,
        in_channels=3,
        patch_size=2,
        hidden_size=32,
        depth=6,
        num_heads=4,
        num_classes=5,
        class_dropout_prob=0.1,
        routes=(Route(1, 3, 0.5),),
    )
    kwargs.update(overrides)
    return DiTConfig(**kwargs)


@pytest.fixture
def model() -> DiT:
    return randomize(DiT(small_config())).eval()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.rand(4, generator=gen)
    y = torch.tensor([0, 1, 4, 5])  # 5 is the null label
    return x, t, y


def compose_config(name: str, overrides: list[str]):
    """Compose ``configs/<name>.yaml`` exactly as the entry points do (typed schema first)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def compose_train(overrides: list[str]):
    return compose_config("train", overrides)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Real WebDataset shards of scikit-learn's digits (8×8), prepared once per session."""
    root = tmp_path_factory.mktemp("shards")
    ensure_prepared("digits", root)
    return root


def digits_run(tmp_path: Path, shards: Path, *extra: str) -> list[str]:
    """A few-second run: SiT-Micro/2 on 8×8 digits (16 tokens, route 1→2)."""
    return [
        "data=digits",
        f"data.root={shards}",
        "data.batch_size=16",
        "data.num_workers=2",
        "model.name=SiT-Micro/2",
        f"paths.root={ROOT}",
        f"paths.runs_dir={tmp_path / 'runs'}",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "optim.lr=1e-3",
        "optim.warmup_steps=2",
        "trainer.max_steps=8",
        "trainer.max_time=null",
        "trainer.val_every_n_steps=4",
        "trainer.log_every_n_steps=2",
        "trainer.progress=none",
        "callbacks.monitor_every_n_steps=2",
        "callbacks.checkpoint.every_n_steps=4",
        "callbacks.checkpoint.last_every_n_steps=2",
        "callbacks.guided_eval.num_samples=20",
        "callbacks.guided_eval.batch_size=20",
        "callbacks.guided_eval.num_steps=2",
        "callbacks.guided_eval.grid_size=10",
        *extra,
    ]


@pytest.fixture(scope="session")
def evaluation_checkpoint(tmp_path_factory):
    """A digits model trained for a few steps and the digits classifier, in their own data root:
    (tmp, shards, training result), shared by the evaluation tests (test_evaluate, test_best_w)."""
    from sgexp.train import run as train  # Lightning and Hydra load on use: most tests never need them

    tmp = tmp_path_factory.mktemp("eval")
    shards = tmp / "shards"
    ensure_prepared("digits", shards)
    subprocess.run(
        [sys.executable, "-m", "sgexp.data", "classifier", "digits", "--root", str(shards)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    result = train(
        compose_train(digits_run(tmp, shards, "trainer.max_steps=30", "callbacks.guided_eval.num_samples=10"))
    )
    return tmp, shards, result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(tmp: Path, backend_store_uri: str | None = None):
    """A real ``mlflow server`` (one worker, proxied artifacts) on a free loopback port, its runs in
    ``backend_store_uri`` (default: the sqlite file ``tmp/srv.db``); stopped and checked gone."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    backend = backend_store_uri or f"sqlite:///{tmp / 'srv.db'}"
    stores = ["--backend-store-uri", backend, "--artifacts-destination", str(tmp / "artifacts")]
    cmd = [sys.executable, "-m", "mlflow", "server", *server, *stores]
    stderr = tmp / "server.err"
    with open(tmp / "server.out", "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=err, start_new_session=True)
    try:
        start, deadline = time.monotonic(), time.monotonic() + 120  # first start: schema migrations
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start (rc={proc.poll()}):\n{stderr.read_text()[-3000:]}")
            time.sleep(0.2)
        yield {"uri": f"http://127.0.0.1:{port}", "artifacts": tmp / "artifacts", "start_s": time.monotonic() - start}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        gone = time.monotonic() + 10
        while time.monotonic() < gone:  # workers die with their parent; wait until the group is empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server processes outlived SIGTERM")
