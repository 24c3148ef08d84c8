"""Benchmarks: the timing helper's interleaving and output, and smoke runs of the scripts.

The numbers themselves are not tested (timings on a shared machine); what is
tested is that the scripts run end to end on tiny sizes, fail soft, and write
the JSON that reports are built from.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_compile import fit_briefly

from sgexp.flops import pass_macs, peak_flops, train_flops
from sgexp.lit.callbacks import TrainingMonitor
from sgexp.lit.module import FlowMatchingModule
from sgexp.models import DiTConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts at the repository root, not an installed package

from benchmarks import timing  # noqa: E402


def test_variants_are_interleaved_abba():
    calls: list[str] = []
    variants = {name: (lambda name=name: calls.append(name)) for name in "AB"}
    stats = timing.time_interleaved(variants, repeats=4, warmup=1)
    assert calls == list("AB" + "AB" + "BA" + "AB" + "BA")  # warm-up, then rounds alternating in order
    assert all(len(s.samples) == 4 for s in stats.values())


def test_paired_ratio_and_realised_fraction():
    a, b = timing.Stats((1.0, 2.0, 4.0)), timing.Stats((2.0, 4.0, 8.0))
    assert timing.paired_ratio(a, b).samples == (0.5, 0.5, 0.5)  # drift between rounds cancels
    assert timing.realised_fraction(0.75, 0.75) == pytest.approx(1.0)
    assert timing.realised_fraction(0.875, 0.75) == pytest.approx(0.5)  # half the analytic saving
    assert math.isnan(timing.realised_fraction(1.0, 1.0))
    assert a.inverse(8).median == 4.0 and (a.min, a.max) == (1.0, 4.0)


def test_json_goes_to_out_with_machine_info(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "device-out"))
    path = timing.write_json("x", {"machine": timing.machine_info("cpu"), "bad": float("nan")})
    assert path == tmp_path / "device-out" / "x.json"
    data = json.loads(path.read_text())
    assert data["bad"] is None  # NaN would not be valid JSON
    for key in ("cpu_model", "cpu_count", "torch", "torch_threads", "git", "time_utc"):
        assert key in data["machine"]


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": ""}
    return subprocess.run(
        [sys.executable, "-m", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_gpu_script_smoke(tmp_path):
    """The GPU script's code path on tiny sizes (CPU here): every section runs and reports."""
    proc = _run("benchmarks.gpu", "--smoke", "--no-compile", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert data["errors"] == [] and data["skipped"] == []
    assert len(data["train"]) == 1 and len(data["sampling"]) == 5 and len(data["router"]) == 2
    row = data["train"][0]
    assert row["dense"]["train_gflops_per_image"] > row["routed"]["train_gflops_per_image"]
    sg = next(r for r in data["sampling"] if r["rule"] == "sg")
    unshared = next(r for r in data["sampling"] if r["rule"] == "sg_unshared")
    assert sg["gflops_per_image_step"] < unshared["gflops_per_image_step"]  # the shared prefix is priced once
    assert sg["prefix_sharing"]["flops_ratio"] < 1 and len(sg["prefix_sharing"]["time_ratio"]["samples"]) == 1
    assert "Training fwd+bwd" in proc.stdout and "Sampling step per rule" in proc.stdout


def test_train_and_sampling_benchmarks_smoke(tmp_path):
    common = ("--model", "SiT-Micro/4@16x4", "--batch", "2", "--repeats", "1", "--warmup", "0")
    for script in ("benchmarks.train_step", "benchmarks.sampling_step"):
        proc = _run(script, *common, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads((tmp_path / "train_step.json").read_text())
    assert train["rows"][0]["flops_ratio_analytic"] < 1
    sampling = json.loads((tmp_path / "sampling_step.json").read_text())
    assert {r["rule"] for r in sampling["rows"]} == {"none", "cfg", "sg", "sg_unshared", "cfg_sg"}


def test_data_resume_benchmark_smoke(tmp_path):
    """Resume at batch 10, 10^4 and 10^6 on a tiny shard set: every case reads one window, not the skipped steps."""
    args = ("--shards", "8", "--samples", "30", "--batch", "4", "--shuffle-shards", "2", "--repeats", "1")
    proc = _run("benchmarks.data_resume", *args, "--warmup", "0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "data_resume.json").read_text())
    assert [r["start_batch"] for r in data["rows"]] == [10, 10**4, 10**6]
    assert data["dataset"]["samples"] == 240 and data["rows"][-1]["epoch"] == 10**6 * 4 // 240  # a later epoch
    window = 2 * data["dataset"]["shard_bytes"]
    for row in data["rows"]:
        assert row["bytes_read"] is None or row["bytes_read"] < window + 2**20  # one window (+ slack)
    assert data["ratio_1e6_to_10"]["median"] > 0


def test_peak_flops_by_device_name_or_environment():
    assert peak_flops("NVIDIA H200") == peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None, {}) is None and peak_flops("NVIDIA GeForce GT 710", {}) is None
    assert peak_flops(None, {"SGEXP_PEAK_TFLOPS": "2.5"}) == 2.5e12
    with pytest.raises(ValueError, match="SGEXP_PEAK_TFLOPS"):
        peak_flops(None, {"SGEXP_PEAK_TFLOPS": "fast"})


def test_training_log_has_model_flops_and_mfu(monkeypatch):
    """TrainingMonitor: train/tflops_per_s from sgexp.flops (3 × forward at γ_train), train/mfu against the peak."""
    monkeypatch.setenv("SGEXP_PEAK_TFLOPS", "0.001")  # a CPU has no known peak: give one
    config = DiTConfig.from_name("SiT-Micro/4", input_size=16, in_channels=3, num_classes=5)
    assert train_flops(config) == 6 * pass_macs(config, 0.5, include_attention=True) < train_flops(config, 0.0)
    trainer = fit_briefly(FlowMatchingModule(config.to_dict()), steps=4, callbacks=[TrainingMonitor(every_n_steps=2)])
    metrics = trainer.callback_metrics
    achieved = metrics["train/images_per_s"].item() * train_flops(config)
    assert metrics["train/tflops_per_s"].item() == pytest.approx(achieved / 1e12, rel=1e-5)
    assert metrics["train/mfu"].item() == pytest.approx(achieved / 1e9, rel=1e-5)
    assert "train/compile_s" not in metrics  # compile is off on a CPU by default


@pytest.mark.slow  # ~1.5 min on 2 shared cores
def test_gpu_script_smoke_with_compiled_rows(tmp_path):
    """The compiled rows (training; CFG batched and SG in one call) on tiny sizes, aot_eager for speed."""
    proc = _run("benchmarks.gpu", "--smoke", tmp_path=tmp_path)  # on a CPU: --compile-backend aot_eager
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert data["errors"] == []
    assert [r["compiled"] for r in data["train"]] == [False, True]
    compiled = [r for r in data["sampling"] if r["compiled"]]
    assert {r["rule"] for r in compiled} == {"cfg", "sg"} and all(r["first_call_s"] > 0 for r in compiled)
    assert data["train"][1]["first_call_s"]["routed"] > 0
