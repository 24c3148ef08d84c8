"""``python -m reproduce``: the whole pipeline end to end on digits (preset smoke), its resumption,
and the stage runner with real subprocesses."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `reproduce` is a folder at the repository root, not an installed package

from reproduce import claims  # noqa: E402
from reproduce.__main__ import check_preset, main  # noqa: E402
from reproduce.runner import run_stages  # noqa: E402
from reproduce.stages import PRESETS, Paths, Stage, build_plan  # noqa: E402

FIGURES = ("results_tread_vs_dense.png", "results_guidance.png", "results_heatmap.png", "results_pareto.png")


@pytest.fixture
def one_torch_thread():
    """Inline stages share this process; one thread is what the pipeline gives each stage."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smoke_pipeline_writes_the_report_and_resumes(tmp_path, one_torch_thread):
    args = ["--preset", "smoke", "--work-dir", str(tmp_path / "work"), "--data-dir", str(tmp_path / "data")]
    args += ["--docs-dir", str(tmp_path / "docs"), "--inline"]
    first = main(args)
    record = first["record"]
    assert record["pending"] == []
    assert len(first["ran"]) == len(build_plan(PRESETS["smoke"], first["paths"]))

    # Every setting of the guidance table, scored on the same samples, with its costs.
    expected = {name for group in PRESETS["smoke"].guidance.values() for name in group}
    assert set(record["guidance"]) == expected
    for row in record["guidance"].values():
        assert math.isfinite(row["fid"]) and row["num_samples"] == 20 and row["gflops_per_sample"] > 0
    assert record["guidance"]["sg_w5"]["relative_to_cfg"] < 1
    # TREAD vs dense: both trained the same number of steps, a curve point per kept checkpoint.
    assert {m: [p["step"] for p in pts] for m, pts in record["curve"].items()} == {"tread": [4, 8], "dense": [4, 8]}
    assert record["final"]["tread"]["step"] == record["final"]["dense"]["step"] == 8
    assert record["training"]["tread"]["train_gflops_per_image"] < record["training"]["dense"]["train_gflops_per_image"]
    # One heatmap of the (γ_s < γ_w) cells of the grid, and the sweep's Pareto set.
    assert {(r["gamma_strong"], r["gamma_weak"]) for r in record["heatmaps"][3.0]} == {(0, 0.5), (0, 0.9), (0.5, 0.9)}
    assert record["sweep"]["summary"]["n_trials"] == 7 and record["sweep"]["summary"]["pareto"]

    docs = tmp_path / "docs"
    text = (docs / "results.md").read_text()
    for figure in FIGURES:
        assert (docs / figure).stat().st_size > 1000 and f"({figure})" in text
    assert "## Which claims hold at this scale" in text and "SG reaches a lower FID than CFG" in text
    sg = record["guidance"]["sg_w5"]  # its cost both ways: as run (prefix shared) and as the paper counts it
    assert sg["gflops_per_sample_unshared"] > sg["gflops_per_sample"]
    assert f"counted the paper's way, both passes in full, {sg['gflops_per_sample_unshared']:.3f}" in text
    assert "python -m sgexp.train experiment=mnist_dense" in text and "resume=/" not in text
    assert json.loads((tmp_path / "work" / "record.json").read_text())["pending"] == []

    # Re-running skips every finished stage; the markers keep their single attempt.
    again = main(args)
    assert again["ran"] == []
    attempts = json.loads((tmp_path / "work" / "stages" / "train_tread.attempts.json").read_text())
    assert len(attempts) == 1
    # An interrupted training (last.ckpt, no marker) is resumed, not restarted.
    train = next(s for s in build_plan(PRESETS["smoke"], first["paths"]) if s.name == "train_tread")
    assert train.command()[-1] == f"resume={tmp_path / 'work' / 'train_tread'}"
    assert "resume=" not in train.shell(fresh=True)


def test_a_work_dir_belongs_to_one_preset(tmp_path):
    check_preset(tmp_path, PRESETS["smoke"].to_dict())
    check_preset(tmp_path, PRESETS["smoke"].to_dict())  # the same preset resumes
    with pytest.raises(ValueError, match=r"--work-dir=.* is invalid: holds a run of another preset .*'steps'"):
        check_preset(tmp_path, PRESETS["full"].to_dict())


@pytest.fixture
def run_code(tmp_path, monkeypatch):
    """Stages run `python -m ENTRY ARGS`: ENTRY=run_code executes its argument (a module on PYTHONPATH)."""
    (tmp_path / "run_code.py").write_text("import sys\nexec(sys.argv[1])\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def _python(code: str) -> tuple[str, tuple[str, ...]]:
    return "run_code", (code,)


def test_runner_runs_subprocesses_by_dependency_and_resumes_after_a_failure(tmp_path, run_code):
    out = tmp_path / "out"
    out.mkdir()
    flag = tmp_path / "fixed"
    threads = f"import os; open({str(out / 'a')!r}, 'w').write(os.environ['OMP_NUM_THREADS'])"
    after_a = f"import pathlib; assert pathlib.Path({str(out / 'a')!r}).exists(); open({str(out / 'b')!r}, 'w')"
    flaky = f"import pathlib, sys; sys.exit(0 if pathlib.Path({str(flag)!r}).exists() else 3)"
    stages = [
        Stage("a", *_python(threads)),
        Stage("b", *_python(after_a), needs=("a",)),
        Stage("c", *_python(flaky)),
        Stage("d", *_python(f"open({str(out / 'd')!r}, 'w')"), needs=("c",)),
    ]
    state, logs = tmp_path / "stages", tmp_path / "logs"
    with pytest.raises(RuntimeError, match=r"stages \['c'\] failed .*c\.log"):
        run_stages(stages, state, logs, jobs=2)
    assert (out / "a").read_text() == "1" and (out / "b").exists()  # one torch thread per stage
    assert not (out / "d").exists()  # d waits for c
    flag.touch()
    assert run_stages(stages, state, logs, jobs=2) == ["c", "d"]  # a and b are not run again
    assert [a["rc"] for a in json.loads((state / "c.attempts.json").read_text())] == [3, 0]
    assert run_stages(stages, state, logs, jobs=2) == []


def test_bad_input_names_the_parameter(tmp_path):
    paths = Paths(tmp_path, tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"jobs=0 is invalid"):
        run_stages([], tmp_path / "s", tmp_path / "l", jobs=0)
    with pytest.raises(ValueError, match=r"needs.* is invalid: \['x'\] are not earlier stages"):
        run_stages([Stage("a", *_python("pass"), needs=("x",))], tmp_path / "s", tmp_path / "l")
    bad = dataclasses.replace(PRESETS["smoke"], checkpoint_every=3)
    with pytest.raises(ValueError, match=r"checkpoint_every=3 is invalid: must divide steps=8"):
        build_plan(bad, paths)
    with pytest.raises(ValueError, match=r"--preset='huge' is invalid: must be one of \['full', 'smoke'\]"):
        main(["--preset", "huge", "--work-dir", str(tmp_path)])


def test_verdicts_count_only_differences_beyond_the_seed_noise():
    assert claims.noise(1000) == pytest.approx(5.0) and claims.noise(250) == pytest.approx(10.0)
    assert claims.verdict(6.0, 1000) == "**holds**"
    assert claims.verdict(-6.0, 1000) == "**does not hold**"
    assert claims.verdict(6.0, 250).startswith("**inconclusive** (difference +6.0 is within the ±10.0")


def test_a_zero_exit_status_without_the_stage_output_is_a_failure(tmp_path, run_code):
    """Lightning answers SIGTERM by stopping early and exiting 0: the stage's output decides."""
    result = tmp_path / "result.json"
    stage = Stage("e", *_python("pass"), output=result)
    with pytest.raises(RuntimeError, match=r"stages \['e'\] failed"):
        run_stages([stage], tmp_path / "s", tmp_path / "l")
    attempt = json.loads((tmp_path / "s" / "e.attempts.json").read_text())[0]
    assert attempt["rc"] == 0 and attempt["failure"] == f"no {result}"
    assert not (tmp_path / "s" / "e.json").exists()
    result.touch()
    assert run_stages([stage], tmp_path / "s", tmp_path / "l") == ["e"]
