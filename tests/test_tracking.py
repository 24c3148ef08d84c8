"""MLflow conventions against real stores: a sqlite file and a real ``mlflow server`` (no mocks)."""

from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import free_port, mlflow_server
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from sgexp import run_record, tracking
from sgexp.lit.mlflow_logger import make_logger

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "sgexp-test"


@pytest.fixture(autouse=True)
def no_global_mlflow_state():
    """Nothing here may change mlflow's process-wide tracking URI or MLFLOW_TRACKING_URI."""
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    yield
    assert (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()) == before


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, artifact root) of a sqlite store laid out as the project default."""
    root = tmp_path_factory.mktemp("store")
    return tracking.default_tracking_uri(root), tracking.default_artifact_root(root)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("server")) as srv:
        yield srv


def train_config():
    cfg = OmegaConf.create(
        {
            "experiment": "mnist_tread",
            "model": {"name": "SiT-Micro/4", "depth": 4, "routes": [[1, 2, 0.5]]},
            "data": {"name": "mnist5k", "batch_size": 128},
            "trainer": {"max_steps": 100, "lr": "${optim.lr}"},
            "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
            "notes": "x" * 7000,
            "weird key@1": {"empty": "", "none": None},
        }
    )
    meta = {"name": "mnist5k-v2", "num_train": 4500, "num_val": 500, "resolution": 28, "classes": list(range(10))}
    return cfg, meta


def exercise(uri: str, artifact_root: str | None, run_dir: Path, tmp: Path) -> tuple[MlflowClient, str]:
    """Open, log, finish, read back, resume, log again: the checks every backend must pass."""
    cfg, meta = train_config()
    logger = make_logger(run_dir, uri, EXPERIMENT, "first", artifact_root=artifact_root, tags={"who": "t"})
    run_id = logger.run_id
    assert (run_dir / "mlflow_run_id").read_text().strip() == run_id
    changed = run_record.log_run_context(
        logger, run_id, config=cfg, meta=meta, checkpoint_dir=run_dir / "checkpoints", root=REPO
    )
    assert changed == {}
    logger.log_hyperparams({"lr": 0.001, "network": {"depth": 4}})
    for step, loss in [(1, 1.0), (2, 0.5)]:
        logger.log_metrics({"train/loss": loss}, step=step)
    grid = torch.rand(3, 16, 24, dtype=torch.bfloat16)  # CxHxW, as torchvision's make_grid gives it
    assert run_record.log_image(logger, grid, "eval/sg/samples", step=2) == "eval/sg/samples"
    (tmp / "note.txt").write_text("hello")
    assert run_record.log_artifact_file(logger, tmp / "note.txt", "extra") == "extra/note.txt"
    logger.finalize("success")

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    params, tags = run.data.params, run.data.tags
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert params["model.depth"] == "4" and params["trainer.lr"] == "0.001"  # interpolation resolved
    assert params["model.routes"] == "[[1, 2, 0.5]]" and params["optim.betas"] == "[0.9, 0.999]"
    assert params["notes"] == "x" * 6000  # mlflow's param length limit
    assert params["weird key_1.empty"] == "" and params["weird key_1.none"] == "None"
    assert params["data.name"] == "mnist5k" and params["data.meta.name"] == "mnist5k-v2"  # config wins
    assert params["data.num_train"] == "4500" and params["data.resolution"] == "28" and "data.classes" not in params
    assert params["lr"] == "0.001" and params["network.depth"] == "4"  # Lightning hparams, the config's "."
    commit, dirty = run_record.git_commit(REPO), run_record.git_dirty(REPO)
    assert tags["git.commit"] == (commit or "unknown")
    assert tags["git.dirty"] == ("unknown" if dirty is None else str(dirty).lower())
    assert tags["sgexp.run_dir"] == str(run_dir.resolve()) and tags["who"] == "t"
    assert tags["sgexp.checkpoint_dir"] == str((run_dir / "checkpoints").resolve())
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    files = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "dataset", "images", "extra"} <= files
    assert [f.path for f in client.list_artifacts(run_id, "dataset")] == ["dataset/meta.json"]
    images = sorted(Path(f.path).name for f in client.list_artifacts(run_id, "images"))  # MLflow's image charts
    assert len(images) == 2 and all(n.startswith("eval~sg~samples+step+2+") for n in images)
    assert {Path(n).suffix for n in images} == {".png", ".webp"}
    local = Path(client.download_artifacts(run_id, "config.yaml", str(tmp)))
    assert yaml.safe_load(local.read_text()) == OmegaConf.to_container(cfg, resolve=True)

    # Resume / requeue: the same run, set running again; same context logs nothing new and does not crash.
    assert tracking.open_run(run_dir, uri, EXPERIMENT, "ignored", artifact_root) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed = make_logger(run_dir, uri, EXPERIMENT, "first", artifact_root=artifact_root)
    assert resumed.run_id == run_id
    assert run_record.log_run_context(resumed, None, config=cfg, meta=meta, root=REPO) == {}
    cfg.trainer.max_steps = 200
    changed = run_record.log_run_context(resumed, None, config=cfg, meta=meta, root=REPO)
    assert changed == {"trainer.max_steps": ("100", "200")}
    resumed.log_hyperparams({"lr": 0.002, "network": {"depth": 4}})  # stock MLFlowLogger would raise here
    resumed.log_metrics({"train/loss": 0.25}, step=3)
    resumed.finalize("success")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "100"
    assert run.data.tags["sgexp.param_changed.trainer.max_steps"] == "200"
    assert run.data.tags["sgexp.param_changed.lr"] == "0.002"
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    (snapshot,) = client.list_artifacts(run_id, "history")
    assert {f.path.rsplit("/", 1)[1] for f in client.list_artifacts(run_id, snapshot.path)} == {
        "config.yaml",
        "meta.json",
    }

    other = tracking.open_run(tmp / "other-run", uri, EXPERIMENT, "second", artifact_root)
    assert other != run_id and client.get_run(other).info.run_name == "second"
    return client, run_id


def test_default_locations(tmp_path):
    uri = tracking.default_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db" and uri.startswith("sqlite:////")
    assert (tmp_path / "runs").is_dir()
    assert tracking.default_artifact_root(tmp_path) == str(tmp_path.resolve() / "runs" / "mlartifacts")
    tracking.check_tracking_uri(uri)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.default_tracking_uri(tmp_path)
    assert tracking.resolve_tracking_uri(None, tmp_path) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking.resolve_tracking_uri(None, tmp_path) == "http://tracking.example:5000"
    assert tracking.resolve_tracking_uri("sqlite:////x/m.db", tmp_path) == "sqlite:////x/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert tracking.resolve_tracking_uri("", tmp_path) == default


@pytest.mark.parametrize("uri", ["ftp://host/mlruns", "file:///tmp/mlruns", "./mlruns", "/abs/mlruns", ""])
def test_unusable_uri_is_a_value_error(uri):
    with pytest.raises(ValueError, match=r"tracking_uri=.*is invalid: .*sqlite.*http.*postgresql.*databricks") as e:
        tracking.check_tracking_uri(uri)
    if uri.startswith(("file:", "./", "/")):
        assert "file store" in str(e.value)


def test_sqlite_check_creates_the_database_directory(tmp_path):
    tracking.check_tracking_uri(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir()


def test_git_commit():
    commit = run_record.git_commit(REPO)
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert run_record.git_dirty(REPO) in (True, False, None)
    if commit is None:
        assert run_record.git_dirty(REPO) is None


def test_git_outside_a_repository(tmp_path):
    assert run_record.git_commit(tmp_path) is None and run_record.git_dirty(tmp_path) is None


def test_unreachable_server_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for call in (
        lambda: tracking.check_tracking_uri(uri),
        lambda: tracking.open_run(tmp_path / "run", uri, EXPERIMENT, "x"),
        lambda: make_logger(tmp_path / "run", uri, EXPERIMENT, "x"),
    ):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=re.escape(uri)) as e:
            call()
        assert time.monotonic() - start < 10
        assert "logger.tracking_uri" in str(e.value) and "MLFLOW_TRACKING_URI" in str(e.value)
    assert not (tmp_path / "run" / "mlflow_run_id").exists()


def test_silent_server_times_out(tmp_path):
    with socket.socket() as listener:  # accepts TCP connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=re.escape(uri)):
            tracking.check_tracking_uri(uri, timeout=1.0)
        assert time.monotonic() - start < 3


def test_a_web_server_that_is_not_mlflow_is_refused():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(RuntimeError, match=re.escape(uri) + r".*answered HTTP 501"):
            tracking.check_tracking_uri(uri)
    finally:
        server.shutdown()
        server.server_close()


def test_flatten_params():
    flat = tracking.flatten_params({"a": {"b": 1, "c": [1, "x"], "d": {}}, "k/../e": True, "long": "y" * 9000})
    assert flat == {"a.b": "1", "a.c": '[1, "x"]', "a.d": "{}", "k/_/e": "True", "long": "y" * 6000}


def test_image_layouts():
    assert run_record._to_uint8(torch.ones(1, 5, 7)).shape == (5, 7)
    assert run_record._to_uint8(np.ones((5, 7, 3), dtype=np.int64) * 255).max() == 255
    assert run_record._to_uint8(np.array([[-1.0, 2.0]])).tolist() == [[0, 255]]
    for bad in (np.zeros((2, 5, 7)), np.zeros(5), np.full((4, 4), 300)):
        with pytest.raises(ValueError, match=r"image\.(shape|dtype)="):
            run_record._to_uint8(bad)


def test_sqlite_run_lifecycle(store, tmp_path):
    uri, artifact_root = store
    client, run_id = exercise(uri, artifact_root, tmp_path / "run", tmp_path)
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location == artifact_root
    on_disk = Path(artifact_root) / run_id / "artifacts"
    assert (on_disk / "config.yaml").is_file() and (on_disk / "dataset" / "meta.json").is_file()
    (png_file,) = (on_disk / "images").glob("eval~sg~samples+step+2+*.png")
    with Image.open(png_file) as png:
        assert png.size == (24, 16) and png.mode == "RGB"


def test_server_run_lifecycle(server, tmp_path):
    client, run_id = exercise(server["uri"], None, tmp_path / "run", tmp_path)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # uploaded over HTTP, not a client path
    on_disk = server["artifacts"] / experiment.experiment_id / run_id / "artifacts"
    assert (on_disk / "config.yaml").is_file() and (on_disk / "dataset" / "meta.json").is_file()
    assert len(list((on_disk / "images").glob("eval~sg~samples+step+2+*.png"))) == 1


def test_open_run_refuses_a_run_the_store_does_not_have(store, tmp_path):
    uri, artifact_root = store
    run_dir = tmp_path / "run"
    run_id = tracking.open_run(run_dir, uri, EXPERIMENT, "r", artifact_root)
    MlflowClient(tracking_uri=uri).delete_run(run_id)
    with pytest.raises(RuntimeError, match="is deleted"):
        tracking.open_run(run_dir, uri, EXPERIMENT, "r", artifact_root)
    (run_dir / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef\n")
    with pytest.raises(RuntimeError, match="does not have"):
        tracking.open_run(run_dir, uri, EXPERIMENT, "r", artifact_root)


def test_other_ranks_do_not_create_or_log(store, tmp_path, monkeypatch):
    uri, artifact_root = store
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = make_logger(tmp_path / "run", uri, EXPERIMENT, "r", artifact_root)
    assert logger.run_id is None and not (tmp_path / "run" / "mlflow_run_id").exists()
    cfg, meta = train_config()
    assert run_record.log_run_context(logger, logger.run_id, config=cfg, meta=meta, root=REPO) is None
    assert run_record.log_image(logger, np.zeros((4, 4)), "eval/sg/samples") is None
    run_record.log_metrics(logger, {"eval/sg/fid": 1.0})
    logger.log_metrics({"loss": 1.0}, step=1)
    logger.finalize("success")


class LoggingModel(BoringModel):
    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()

    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("train_loss", loss)
        return {"loss": loss}


@pytest.mark.filterwarnings("ignore:.*(resuming from a checkpoint|exists and is not empty|LeafSpec)")
def test_trainer_fit_and_resume(store, tmp_path):
    """A real Trainer logs hparams, metrics and checkpoints; a resumed fit with a changed hparam continues."""
    uri, artifact_root = store
    run_dir = tmp_path / "run"
    run_ids = []
    for lr, steps in [(0.1, 3), (0.2, 6)]:
        logger = make_logger(run_dir, uri, EXPERIMENT, "fit", artifact_root=artifact_root, log_model=True)
        trainer = L.Trainer(
            max_steps=steps,
            logger=logger,
            default_root_dir=tmp_path,
            log_every_n_steps=1,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last")],
        )
        last = run_dir / "checkpoints" / "last.ckpt"
        trainer.fit(LoggingModel(lr), ckpt_path=last if last.exists() else None)
        run_ids.append(logger.run_id)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_ids[0])
    assert run_ids[0] == run_ids[1] and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.1" and run.data.tags["sgexp.param_changed.lr"] == "0.2"
    assert [m.step for m in client.get_metric_history(run_ids[0], "train_loss")] == list(range(6))
    assert "last/last.ckpt" in {f.path for f in client.list_artifacts(run_ids[0], "last")}  # log_model=True


# --------------------------------------------------------------------------- the MLflow UI's view of our runs


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_experiments_declare_model_training(where, store, request, tmp_path):
    """The MLflow 3 UI opens an experiment on its runs table only if it is a model training experiment."""
    uri = store[0] if where == "sqlite" else request.getfixturevalue("server")["uri"]
    client = MlflowClient(tracking_uri=uri)
    made = tracking.ensure_experiment(client, f"kind-new-{where}", None, uri)
    assert client.get_experiment(made).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    old = client.create_experiment(f"kind-old-{where}")  # made before sgexp declared the kind: declared now
    assert tracking.ensure_experiment(client, f"kind-old-{where}", None, uri) == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    chosen = client.create_experiment(f"kind-chosen-{where}", tags={tracking.EXPERIMENT_KIND_TAG: "genai_development"})
    tracking.ensure_experiment(client, f"kind-chosen-{where}", None, uri)  # a kind chosen in the UI is kept
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"
    run_id = tracking.open_run(tmp_path / "run", uri, f"kind-run-{where}", "r")  # open_run goes through it
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING


OPEN_PARENT = """
import os, signal, sys, optuna
from sgexp.sweeps.storage import open_storage
from sgexp.sweeps.study import load_study
from sgexp.sweeps.tracker import Tracker
uri, storage, root = sys.argv[1:]
cfg = load_study("sparsity_pareto", [f"paths.root={root}", "logger.experiment=sweeps-ui"])
study = optuna.create_study(storage=open_storage(storage), study_name=cfg.name, directions=["minimize"] * 2)
print(Tracker.open_parent(study, cfg, uri, {"checkpoint": "x.ckpt", "storage": storage}).parent, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would: no handler runs
"""


def test_sweep_parents_are_named_by_storage_and_killed_ones_closed(store, tmp_path):
    """Sweeps of one study on several storages get parents told apart by name; a parent left RUNNING by a
    SIGKILLed command is ended KILLED by the next command on the study, one whose driver lives is left alone,
    and the killed sweep resumed on its own storage reuses its parent."""
    import optuna

    from sgexp.sweeps.storage import open_storage
    from sgexp.sweeps.study import load_study
    from sgexp.sweeps.tracker import Tracker, parent_run_name

    uri, client = store[0], MlflowClient(tracking_uri=store[0])
    tracking.init_store(uri)  # the subprocess must not race this process on a fresh sqlite file's schema
    cfg = load_study("sparsity_pareto", [f"paths.root={REPO}", "logger.experiment=sweeps-ui"])

    def open_parent(name: str, resume: bool = False) -> str:
        storage = str(tmp_path / name / "study.log")
        study = optuna.create_study(
            storage=open_storage(storage), study_name=cfg.name, directions=["minimize"] * 2, load_if_exists=resume
        )
        return Tracker.open_parent(study, cfg, uri, {"checkpoint": "x.ckpt", "storage": storage}).parent

    args = [sys.executable, "-c", OPEN_PARENT, uri, str(tmp_path / "a" / "study.log"), str(REPO)]
    dead = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-2000:]
    killed = dead.stdout.strip()
    assert client.get_run(killed).info.status == "RUNNING"  # what the UI showed forever before
    live = open_parent("b")  # driven by this process, which lives
    latest = open_parent("c")  # the next command on the study, on a third storage
    runs = {r: client.get_run(r) for r in (killed, live, latest)}
    assert runs[killed].info.status == "KILLED" and "gone" in runs[killed].data.tags["sgexp.closed_by"]
    assert runs[live].info.status == "RUNNING" and runs[latest].info.status == "RUNNING"
    names = {r.info.run_name for r in runs.values()}
    assert len(names) == 3 and all(n.startswith("sweep sparsity_pareto @ ") for n in names)
    assert runs[latest].info.run_name == parent_run_name("sparsity_pareto", str(tmp_path / "c" / "study.log"))
    assert runs[latest].info.run_name.startswith("sweep sparsity_pareto @ c/study.log (")
    assert runs[latest].data.tags["sgexp.storage"] == str(tmp_path / "c" / "study.log")
    assert open_parent("a", resume=True) == killed and client.get_run(killed).info.status == "RUNNING"


def test_parent_run_names():
    from sgexp.sweeps.tracker import parent_run_name

    a = parent_run_name("s", "/x/runs/optuna/s.log")
    assert a.startswith("sweep s @ optuna/s.log (") and a != parent_run_name("s", "/y/runs/optuna/s.log")
    rdb = parent_run_name("s", "postgresql://me:secret@db.example:5432/optuna")
    assert rdb.startswith("sweep s @ postgresql:db.example:5432/optuna (") and "secret" not in rdb
    assert parent_run_name("s", "sqlite:////abs/studies.db").startswith("sweep s @ sqlite:studies.db (")
