"""``python -m sgexp.evaluate`` end to end: a trained checkpoint, the project's classifier,
domain FID, costs, common random numbers, MLflow nesting and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from sgexp.diffusion import Sampler, cfg, sparse_guidance
from sgexp.diffusion.guidance import CrossingScheduleWarning
from sgexp.eval.settings import make_settings
from sgexp.evaluate import run as evaluate
from sgexp.flops import sample_cost
from sgexp.lit.module import FlowMatchingModule


@pytest.fixture
def trained(evaluation_checkpoint):
    """conftest's session checkpoint: (tmp, shards, training result); tests/test_best_w.py shares it."""
    return evaluation_checkpoint


def eval_overrides(tmp: Path, shards: Path, checkpoint: str, *extra: str) -> list[str]:
    return [
        f"checkpoint={checkpoint}",
        f"paths.root={ROOT}",
        f"paths.data_dir={shards}",
        f"paths.runs_dir={tmp / 'runs'}",
        f"logger.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
        "num_samples=40",
        "batch_size=40",
        "sampler.steps=4",
        "grid_size=20",
        *extra,
    ]


def test_evaluate_scores_each_setting(trained):
    tmp, shards, result = trained
    overrides = eval_overrides(
        tmp,
        shards,
        "latest",
        "guidance=[none,cfg,sg,cfg_sg]",
        # SG at w=1 is its strong branch alone: D(c; 0.5) = unguided at γ=0.5, on the same samples.
        "+guidance.sg_w1={rule: sg, scale: 1.0, gamma_strong: '0.5', gamma_weak: '0.9'}",
        "+guidance.none_05={rule: none, gamma_strong: '0.5'}",
    )
    results = evaluate(compose_config("evaluate", overrides))
    rows = {r["setting"]: r for r in results["rows"]}
    assert set(rows) == {"none", "cfg", "sg", "cfg_sg", "sg_w1", "none_05"}
    assert results["checkpoint"] == str(result.checkpoint) and results["step"] == 30
    assert "domain FID" in results["metric"]
    for row in rows.values():
        assert math.isfinite(row["fid"]) and row["fid"] > 0
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["class_accuracy"] <= 1
        assert row["num_samples"] == 40 and row["seconds_per_sample"] > 0
        assert Path(row["grid"]).is_file()
    # Common random numbers: the same samples, bit for bit, give the same metrics.
    assert rows["sg_w1"]["fid"] == rows["none_05"]["fid"]
    assert rows["sg_w1"]["class_accuracy"] == rows["none_05"]["class_accuracy"]
    assert rows["none"]["fid"] != rows["none_05"]["fid"]
    # Bootstrap intervals over the sample indices, and one paired interval per pair of settings.
    for row in rows.values():
        assert row["fid_ci"][0] < row["fid"] < row["fid_ci"][1]
        assert row["precision_ci"][0] <= row["precision"] <= row["precision_ci"][1]
    paired = {(p["a"], p["b"]): p for p in results["paired"]}
    assert len(results["paired"]) == len(paired) == len(rows) * (len(rows) - 1) // 2
    for (a, b), p in paired.items():
        assert p["metric"] == "fid" and p["diff"] == rows[a]["fid"] - rows[b]["fid"]
        assert p["ci"][0] <= p["diff"] <= p["ci"][1]
    same = paired.get(("sg_w1", "none_05")) or paired[("none_05", "sg_w1")]
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]  # the same samples in every redraw
    # Costs are the analytic model's, for the rule as run.
    config = FlowMatchingModule.load_from_checkpoint(result.checkpoint, map_location="cpu").config
    sampler = Sampler("euler", 4)
    assert rows["cfg"]["gflops_per_sample"] == pytest.approx(sample_cost(config, cfg(1.5), sampler).gflops_per_sample)
    sg = sample_cost(config, sparse_guidance(5.0, 0.5, 0.9), sampler).gflops_per_sample
    assert rows["sg"]["gflops_per_sample"] == pytest.approx(sg)
    # the paper's convention counts both SG passes in full; sgexp runs their dense prefix once
    sg_full = sample_cost(config, sparse_guidance(5.0, 0.5, 0.9), sampler, share_prefix=False).gflops_per_sample
    assert rows["sg"]["gflops_per_sample_unshared"] == pytest.approx(sg_full) and sg_full > sg
    assert rows["cfg"]["gflops_per_sample_unshared"] == rows["cfg"]["gflops_per_sample"]  # nothing shared in CFG
    assert rows["sg"]["relative_to_cfg"] < 1.0 and rows["cfg"]["relative_to_cfg"] == pytest.approx(1.0)

    out = Path(results["out_dir"])
    assert json.loads((out / "results.json").read_text())["rows"][0]["setting"] == results["rows"][0]["setting"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(results["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id  # nested under the training run
    assert run.data.metrics["eval/sg/fid"] == pytest.approx(rows["sg"]["fid"])
    assert run.data.metrics["eval/sg/fid_ci_low"] == pytest.approx(rows["sg"]["fid_ci"][0])
    assert run.data.metrics["eval/sg/fid_ci_high"] == pytest.approx(rows["sg"]["fid_ci"][1])
    # the training run logged the same keys for its own end-of-training evaluation (one vocabulary)
    assert "eval/sg/fid" in client.get_run(result.mlflow_run_id).data.metrics
    [pair] = [p for p in results["paired"] if (p["a"], p["b"], p["metric"]) == ("cfg", "sg", "fid")]
    assert run.data.metrics["eval/paired/cfg-sg/fid_diff"] == pytest.approx(pair["diff"])


def test_results_do_not_depend_on_the_batch_size(trained):
    tmp, shards, result = trained
    runs = [
        evaluate(
            compose_config(
                "evaluate",
                eval_overrides(
                    tmp,
                    shards,
                    str(result.run_dir),
                    "guidance=[sg]",
                    f"batch_size={b}",
                    "logger.enabled=false",
                    "bootstrap=0",
                ),
            )
        )
        for b in (40, 7)
    ]
    a, b = (r["rows"][0] for r in runs)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-4)
    assert a["class_accuracy"] == b["class_accuracy"]
    assert "fid_ci" not in a and runs[0]["paired"] == []  # bootstrap=0: no intervals


@pytest.mark.parametrize(
    "extra,error,match",
    [
        (["guidance=[ag]"], ValueError, "weak_checkpoint=None is invalid"),
        (["guidance=[sg]", "guidance.sg.gamma_strong='0.95'"], ValueError, "gamma_strong=0.95 is invalid"),
        (["extractor=inception"], Exception, "inception-2015-12-05.pt"),
        (["bootstrap=-1"], ValueError, "bootstrap=-1 is invalid"),
        (["ci_level=95"], ValueError, r"ci_level=95.0 is invalid: a confidence level"),
        (["compile=maybe"], ValueError, r"compile='maybe' is invalid: must be null, 'auto'"),
        (["compile_mode=fastest"], ValueError, r"compile_mode='fastest' is invalid: must be one of"),
    ],
)
def test_bad_input_fails_before_sampling(trained, extra, error, match):
    tmp, shards, result = trained
    with pytest.raises(error, match=match):
        evaluate(
            compose_config(
                "evaluate", eval_overrides(tmp, shards, str(result.checkpoint), *extra, "logger.enabled=false")
            )
        )


@pytest.mark.slow  # inductor compiles the sampling step on the CPU (gcc): about a minute
def test_compiled_evaluation_scores_the_same_samples_as_eager(trained):
    """``compile=true``: the draws stay eager, the network runs compiled; the scores agree up to the
    kernels' float reordering (a pixel rounding the other way to uint8 moves FID a little)."""
    tmp, shards, result = trained
    rows = {}
    for compile in ("false", "true"):
        extra = ("guidance=[cfg,sg]", f"compile={compile}", "logger.enabled=false", "bootstrap=0")
        results = evaluate(compose_config("evaluate", eval_overrides(tmp, shards, str(result.checkpoint), *extra)))
        rows[compile] = {r["setting"]: r for r in results["rows"]}
    for setting in ("cfg", "sg"):
        assert rows["true"][setting]["fid"] == pytest.approx(rows["false"][setting]["fid"], rel=1e-2)
        accuracy = rows["false"][setting]["class_accuracy"]
        assert rows["true"][setting]["class_accuracy"] == pytest.approx(accuracy, abs=0.05)


def test_gamma_is_a_number_or_a_cosine_schedule_unquoted():
    """γ needs no quotes: a float from YAML (configs/guidance/sg.yaml) or the command line, or cosine:START:END."""
    overrides = [
        "guidance=[sg,sg_cosine]",
        "+guidance.sg_cli={rule: sg, scale: 3.0, gamma_strong: 0.25, gamma_weak: cosine:0.9:0.6}",
        "+guidance.quoted={rule: sg, scale: 3.0, gamma_strong: '0.5', gamma_weak: '0.9'}",
    ]
    cfg = compose_config("evaluate", overrides)
    assert cfg.guidance.sg.gamma_strong == 0.5 and isinstance(cfg.guidance.sg.gamma_strong, float)  # from YAML
    with pytest.warns(CrossingScheduleWarning):  # sg_cosine's schedules cross, as its YAML file says
        built = {s.name: s.rule.to_dict() for s in make_settings(OmegaConf.to_container(cfg.guidance))}
        assert built["sg_cosine"] == sparse_guidance(5.0, "cosine:0:0.6", "cosine:0.6:0").to_dict()
    assert built["sg"] == sparse_guidance(5.0, 0.5, 0.9).to_dict()
    assert built["quoted"] == sparse_guidance(3.0, 0.5, 0.9).to_dict()
    assert built["sg_cli"] == sparse_guidance(3.0, 0.25, "cosine:0.9:0.6").to_dict()
    too_sparse = compose_config("evaluate", ["guidance=[sg]", "guidance.sg.gamma_strong=1.5"])
    with pytest.raises(ValueError, match=r"guidance.sg.gamma_strong=1.5 is invalid: sparsity"):
        make_settings(OmegaConf.to_container(too_sparse.guidance))
    with pytest.raises(ValueError, match=r"guidance.sg.gamma_weak='half' is invalid: expected a number"):
        make_settings({"sg": {"rule": "sg", "gamma_weak": "half"}})


def test_missing_checkpoint(tmp_path, trained):
    _, shards, _ = trained
    with pytest.raises(FileNotFoundError, match="checkpoint='latest' is invalid: no run"):
        evaluate(compose_config("evaluate", eval_overrides(tmp_path, shards, "latest", "logger.enabled=false")))
    with pytest.raises(FileNotFoundError, match="checkpoint='nope.ckpt' is invalid"):
        evaluate(compose_config("evaluate", eval_overrides(tmp_path, shards, "nope.ckpt", "logger.enabled=false")))


def test_torchrun_gives_the_single_process_results(trained):
    """``torchrun -m sgexp.evaluate`` on 2 CPU processes (gloo): the module joins the process group
    itself, each rank samples half of the indices, rank 0 alone writes results.json, and every FID (on
    the selection sample too) equals the single-process run's on the same indices."""
    tmp, shards, result = trained
    extra = ["guidance=[none,cfg]", "select=best_w", "w_grid=[1.5,3]", "select_samples=12", "num_samples=20"]
    extra += ["batch_size=4", "bootstrap=50", "grid_size=0", "logger.enabled=false", "device=cpu"]
    overrides = eval_overrides(tmp, shards, str(result.checkpoint), *extra)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run(
        [*torchrun, "-m", "sgexp.evaluate", *overrides, f"out_dir={tmp / 'ddp'}"],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("paired differences") == 1  # rank 0 alone prints the tables
    ddp = json.loads((tmp / "ddp" / "results.json").read_text())
    single = evaluate(compose_config("evaluate", [*overrides, f"out_dir={tmp / 'single'}"]))
    for a, b in zip(ddp["rows"], single["rows"], strict=True):
        assert a["setting"] == b["setting"] and a["scale"] == b["scale"]
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-4) and a["class_accuracy"] == b["class_accuracy"]
        assert a["fid_ci"] == pytest.approx(b["fid_ci"], rel=1e-3)
    fids = [[f["fid"] for f in r["settings"]["cfg"]["fid"]] for r in (ddp["selection"], single["selection"])]
    assert fids[0] == pytest.approx(fids[1], rel=1e-4)
    assert ddp["paired"][0]["diff"] == pytest.approx(single["paired"][0]["diff"], rel=1e-3, abs=1e-6)
