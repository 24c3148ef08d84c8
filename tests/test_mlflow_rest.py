"""One MLflow vocabulary: the metric keys every kind of run shares, params logged once, system metrics,
and all of it read back as a user's script would, over the REST API of a real ``mlflow server``.

A tiny training, an evaluation of its checkpoint and a 2-trial sweep log to one server on 127.0.0.1;
plain HTTP (``runs/search``, ``metrics/get-history``, ``artifacts/list``) then finds the same metric key in
all three kinds of run, the trial runs nested under the study's parent, the Pareto artifacts, the training
run's system metrics and its sample grids as images with a step, and each param once.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, compose_train, digits_run, mlflow_server
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from sgexp import run_record, tracking
from sgexp.data import ensure_prepared
from sgexp.eval import train_classifier
from sgexp.evaluate import run as evaluate
from sgexp.lit.mlflow_logger import make_logger
from sgexp.sweeps import cli
from sgexp.tracking import flatten_params
from sgexp.train import run as train

EXPERIMENT = "sgexp-vocabulary"
REPO = ROOT
SHARED = "eval/cfg/fid"  # the training's, the evaluation's and the CFG baseline trial's setting "cfg"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, str]:
    """(tracking URI, artifact root) of a sqlite store laid out as the project default."""
    root = tmp_path_factory.mktemp("store")
    return tracking.default_tracking_uri(root), tracking.default_artifact_root(root)


@pytest.fixture
def one_thread():
    """One torch thread: two on two busy cores run far slower (spin-waits), as tests/test_sweep.py notes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_metric_vocabulary():
    """Training, sgexp.evaluate and sweep trials name a setting's numbers the same way."""
    row = {"setting": "sg", "fid": 12.5, "fid_ci": [11.0, 14.0], "num_samples": 10, "decisive": True, "strong": "m"}
    assert run_record.eval_metrics("sg", row) == {
        "eval/sg/fid": 12.5,
        "eval/sg/fid_ci_low": 11.0,
        "eval/sg/fid_ci_high": 14.0,
        "eval/sg/num_samples": 10.0,
    }
    pair = {"a": "cfg", "b": "sg", "metric": "fid", "diff": -1.5, "ci": [-3.0, 0.5]}
    assert run_record.paired_metrics(pair) == {
        "eval/paired/cfg-sg/fid_diff": -1.5,
        "eval/paired/cfg-sg/fid_ci_low": -3.0,
        "eval/paired/cfg-sg/fid_ci_high": 0.5,
    }
    assert run_record.eval_key("cfg_sg", "samples") == "eval/cfg_sg/samples"


def duplicated_params(params: dict[str, str], config_keys: set[str]) -> list[tuple[str, str]]:
    """Keys beyond the config's that repeat a config value: ``lr`` or ``optim/lr`` next to ``optim.lr``."""
    extra = [k for k in params if k not in config_keys]
    return [
        (a, b)
        for a in extra
        for b in config_keys & set(params)
        if params[a] == params[b] and (a.replace("/", ".") == b or b.endswith("." + a.replace("/", ".")))
    ]


def test_module_hparams_are_logged_once_beside_the_config(store, tmp_path):
    """The training's two sources of params, the resolved config and the Lightning module's hparams, give
    each value one key: the module adds only what the config lacks (the network's resolved shape)."""
    from conftest import compose_train

    from sgexp.lit.module import FlowMatchingModule
    from sgexp.train import model_config

    cfg = compose_train([f"paths.root={REPO}", "model.name=SiT-Micro/2", "optim.lr=0.002"])
    meta = {"resolution": 8, "channels": 1, "num_classes": 10}
    optim = OmegaConf.to_object(cfg.optim)
    module = FlowMatchingModule(model_config(cfg, meta).to_dict(), optim, seed=cfg.seed, dataset=cfg.data.name)
    logger = make_logger(tmp_path / "run", store[0], EXPERIMENT, "params", store[1], system_metrics=False)
    run_record.log_run_context(logger, None, config=cfg, meta=meta, root=REPO)
    client = MlflowClient(tracking_uri=store[0])
    config_keys = set(client.get_run(logger.run_id).data.params)
    logger.log_hyperparams(module.hparams)  # what Lightning does at fit start
    logger.finalize("success")
    run = client.get_run(logger.run_id)
    params = run.data.params
    assert params["optim.lr"] == "0.002" and params["model.depth"] == "4" and params["data.name"] == cfg.data.name
    assert not [k for k in params if "/" in k] and "dataset" not in params and "lr" not in params
    assert duplicated_params(params, config_keys) == [] and set(params) - config_keys  # the network's shape
    assert duplicated_params({**params, "lr": "0.002"}, config_keys) == [("lr", "optim.lr")]  # the check can fail
    assert not [t for t in run.data.tags if t.startswith("sgexp.param_changed")]


def test_system_metrics_of_a_run(store, tmp_path, monkeypatch):
    """MLflow's system metrics (psutil) while the logger lives, stopped by finalize, continued on resume."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client, key = MlflowClient(tracking_uri=store[0]), "system/cpu_utilization_percentage"
    steps = []
    for _ in range(2):  # a start and a resume of the same run
        logger = make_logger(tmp_path / "run", store[0], EXPERIMENT, "system", store[1])
        deadline = time.monotonic() + 30
        while len(client.get_metric_history(logger.run_id, key)) <= len(steps) and time.monotonic() < deadline:
            time.sleep(0.2)
        logger.finalize("success")
        assert logger._system_monitor is None
        assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor" and t.is_alive()]
        steps = [m.step for m in client.get_metric_history(logger.run_id, key)]
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and "system/system_memory_usage_megabytes" in run.data.metrics
    assert steps == sorted(set(steps)) and len(steps) >= 2  # the resumed run continued the steps
    off = make_logger(tmp_path / "off", store[0], EXPERIMENT, "off", store[1], system_metrics=False)
    assert off._system_monitor is None
    off.finalize("success")


class Rest:
    """The MLflow REST API 2.0 of a server, by plain HTTP."""

    def __init__(self, uri: str):
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"

    def get(self, endpoint: str, **query) -> dict:
        url = self.base + endpoint + "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    def post(self, endpoint: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.base + endpoint, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def runs(self) -> list[dict]:
        experiments = [e["experiment_id"] for e in self.post("experiments/search", {"max_results": 100})["experiments"]]
        return self.post("runs/search", {"experiment_ids": experiments, "max_results": 1000}).get("runs", [])

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.get("metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        return [f["path"] for f in self.get("artifacts/list", run_id=run_id, path=path).get("files", [])]


def pairs(run: dict, field: str) -> dict[str, str]:
    """A searched run's tags or params as a mapping."""
    return {item["key"]: item["value"] for item in run["data"].get(field, [])}


def test_training_evaluation_and_sweep_share_one_vocabulary_on_a_server(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # the training's system metrics
    shards = tmp_path / "shards"
    train_classifier(ensure_prepared("digits", shards), epochs=1)  # domain FID in every kind of run
    (tmp_path / "server").mkdir()
    with mlflow_server(tmp_path / "server") as server:
        uri = server["uri"]
        overrides = [
            f"logger.tracking_uri={uri}" if o.startswith("logger.tracking_uri=") else o
            for o in digits_run(tmp_path, shards, "trainer.max_steps=4", "callbacks.guided_eval.num_samples=10")
        ]
        training_cfg = compose_train(overrides)
        result = train(training_cfg)
        evaluation = evaluate(
            compose_config(
                "evaluate",
                [
                    f"checkpoint={result.checkpoint}",
                    f"paths.root={ROOT}",
                    f"paths.data_dir={shards}",
                    f"logger.tracking_uri={uri}",
                    "guidance=[cfg,sg]",
                    "num_samples=20",
                    "batch_size=20",
                    "sampler.steps=2",
                    "grid_size=10",
                    "bootstrap=50",
                ],
            )
        )
        sets = [f"checkpoint={result.checkpoint}", f"paths.root={ROOT}", f"paths.data_dir={shards}"]
        sets += [f"paths.runs_dir={tmp_path / 'runs'}", "sampler.steps=2", "batch_size=24", "grid_size=10"]
        args = ["--study", "sparsity_pareto", "--storage", str(tmp_path / "study.log"), "--tracking-uri", uri]
        args += ["--n-trials", "2", "--samples", "12", "--final-samples", "24"]
        summary = cli.main([*args, *(a for s in sets for a in ("--set", s))])

        rest = Rest(uri)
        runs = {r["info"]["run_id"]: r for r in rest.runs()}
        kinds: dict[str, list[str]] = {}
        for run_id, run in runs.items():
            kinds.setdefault(pairs(run, "tags").get("sgexp.kind", "training"), []).append(run_id)
        assert sorted((k, len(v)) for k, v in kinds.items()) == [
            ("evaluation", 1),
            ("sweep", 1),
            ("sweep-trial", 2),
            ("training", 1),
        ]
        (training,), (evaluation_run,), (parent,) = kinds["training"], kinds["evaluation"], kinds["sweep"]
        assert training == result.mlflow_run_id and evaluation_run == evaluation["mlflow_run_id"]
        assert parent == summary["mlflow_parent_run_id"]

        # One key for one setting in all three kinds of run, at the checkpoint's training step (4).
        cfg_trial = next(r for r in kinds["sweep-trial"] if pairs(runs[r], "tags")["sgexp.family"] == "cfg")
        for run_id in (training, evaluation_run, cfg_trial):
            (point,) = rest.history(run_id, SHARED)
            assert point["step"] == 4 and math.isfinite(point["value"]), (run_id, point)
        rows = {row["setting"]: row for row in evaluation["rows"]}
        assert rest.history(evaluation_run, SHARED)[0]["value"] == pytest.approx(rows["cfg"]["fid"])
        assert rest.history(evaluation_run, "eval/cfg/fid_ci_low")[0]["value"] == pytest.approx(
            rows["cfg"]["fid_ci"][0]
        )
        for run_id in kinds["sweep-trial"]:  # no bare keys: everything a trial logs is a setting's
            keys = [m["key"] for m in runs[run_id]["data"]["metrics"]]
            family = pairs(runs[run_id], "tags")["sgexp.family"]
            assert keys and all(k.startswith(f"eval/{family}/") for k in keys), keys

        # The trials are nested under the study's parent, which holds the Pareto report.
        assert {pairs(runs[r], "tags")["mlflow.parentRunId"] for r in kinds["sweep-trial"]} == {parent}
        assert pairs(runs[evaluation_run], "tags")["mlflow.parentRunId"] == training
        report = {Path(p).name for p in rest.artifacts(parent, "report")}
        assert {"pareto.html", "pareto.png", "pareto.csv", "summary.json"} <= report

        # The training run: system metrics (psutil) over time, sample grids as images with their step.
        system = [k["key"] for k in runs[training]["data"]["metrics"] if k["key"].startswith("system/")]
        assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
        assert len(rest.history(training, "system/cpu_utilization_percentage")) >= 2
        images = {Path(p).name for p in rest.artifacts(training, "images")}
        assert any(n.startswith("eval~cfg~samples+step+4+") and n.endswith(".png") for n in images), images
        assert pairs(runs[training], "tags").get("mlflow.loggedImages") == "True"
        assert any(
            Path(p).name.startswith("eval~cfg~samples+step+4+") for p in rest.artifacts(evaluation_run, "images")
        )
        assert Path(result.sample_grids[0]).is_file()  # the PNG stays on disk too

        # Each param once: the module's hparams add only what the resolved config lacks.
        params = pairs(runs[training], "params")
        config_keys = set(flatten_params(training_cfg))
        assert duplicated_params(params, config_keys) == [] and not [k for k in params if "/" in k]
        assert not [t for t in pairs(runs[training], "tags") if t.startswith("sgexp.param_changed")]
