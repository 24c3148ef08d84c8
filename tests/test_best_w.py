"""``select=best_w`` (``sgexp.eval.selection``): each scaled setting's w picked on a small sample of
common random numbers, how decisive the pick was (paired intervals), bad input, and end to end
through ``sgexp.evaluate`` on a trained checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import compose_config
from test_evaluate import eval_overrides

from sgexp.eval.metrics import ReferenceStats, fid_from_features
from sgexp.eval.selection import candidate_name, check_selection, describe, select_best_w
from sgexp.evaluate import run as evaluate

DIM, N = 8, 400
SPECS = {
    "none": {"rule": "none"},
    "cfg": {"rule": "cfg", "scale": 1.5},
    "sg": {"rule": "sg", "scale": 5.0, "gamma_strong": 0.5, "gamma_weak": 0.9},
}


def population(dim: int = DIM) -> ReferenceStats:
    return ReferenceStats(np.zeros(dim), np.eye(dim), np.zeros((0, dim), np.float32), 0, "gauss", "val")


class Synthetic:
    """Scores a candidate without a model: sample i is z_i + |w − best|·step·1 for every w (the same z:
    common random numbers), so against N(0, I) the FID grows with the distance of w from ``best``."""

    def __init__(self, best: dict[str, float], step: float = 0.15, jitter: float = 0.0, seed: int = 0):
        self.best, self.step, self.jitter, self.calls = best, step, jitter, []
        self.z = np.random.default_rng(seed).standard_normal((N, DIM))

    def __call__(self, setting):
        self.calls.append(setting.name)
        w = setting.rule.scale
        x = self.z + abs(w - self.best[setting.name.split("@")[0]]) * self.step
        if self.jitter:  # noise of its own per w: what common random numbers cannot cancel
            x = x + self.jitter * np.random.default_rng(int(w * 1000)).standard_normal(x.shape)
        return {"fid": fid_from_features(x, np.zeros(DIM), np.eye(DIM))}, {"fid": x}


def test_the_lowest_fid_of_the_grid_is_picked_and_the_pick_is_decisive():
    grid = [1.0, 2.0, 3.0, 4.0, 6.0]
    score, saved = Synthetic({"cfg": 2.0, "sg": 4.0}), []
    chosen, record = select_best_w(SPECS, grid, score, population(), n_boot=200, seed=0, save=saved.append)
    assert chosen["cfg"] == {**SPECS["cfg"], "scale": 2.0} and chosen["sg"] == {**SPECS["sg"], "scale": 4.0}
    assert chosen["none"] == SPECS["none"] and record["fixed"] == ["none"]  # no scale: not scored
    # every w of the grid once per scaled setting, in order, nothing else
    assert score.calls == [candidate_name(n, w) for n in ("cfg", "sg") for w in grid]
    cfg = record["settings"]["cfg"]
    assert cfg["picked"] == 2.0 and [f["w"] for f in cfg["fid"]] == grid
    fids = {f["w"]: f["fid"] for f in cfg["fid"]}
    assert min(fids, key=fids.get) == 2.0
    for p in cfg["paired"]:  # FID(w) − FID(picked), each other w clearly worse here
        assert p["diff"] == pytest.approx(fids[p["w"]] - fids[2.0])
        if p["w"] == 2.0:
            assert p["ci"] == [0.0, 0.0]
        else:
            assert p["ci"][0] > 0
    assert cfg["within_noise"] == [2.0] and cfg["decisive"] is True
    assert "every other w is worse" in describe("cfg", cfg)
    # saved after every candidate, the last with every candidate's row
    assert len(saved) == 2 * len(grid) + 2 and set(saved[-1]["rows"]) == set(score.calls)


def test_a_tie_within_the_noise_is_reported_and_the_pick_stays_deterministic():
    """w = 2 and w = 3 lie equally far from 2.5: the same features, the same FID. The smaller w is
    picked, its paired interval against the other is [0, 0] (inside the noise), the pick not decisive."""
    grid = [2.0, 3.0, 5.0]
    chosen, record = select_best_w({"cfg": SPECS["cfg"]}, grid, Synthetic({"cfg": 2.5}), population(), n_boot=100)
    cfg = record["settings"]["cfg"]
    assert chosen["cfg"]["scale"] == cfg["picked"] == 2.0
    assert cfg["within_noise"] == [2.0, 3.0] and cfg["decisive"] is False
    assert "w=3 within the noise" in describe("cfg", cfg)
    # a near tie (different samples, FIDs within their noise) is inconclusive too: the lower estimate wins
    near = Synthetic({"cfg": 2.0}, step=0.01, jitter=0.3)
    chosen, record = select_best_w({"cfg": SPECS["cfg"]}, [2.0, 2.1], near, population(), n_boot=200)
    cfg = record["settings"]["cfg"]
    fids = {f["w"]: f["fid"] for f in cfg["fid"]}
    assert cfg["picked"] == min(fids, key=fids.get) and cfg["decisive"] is False
    # bootstrap=0: a pick without intervals
    _, record = select_best_w({"cfg": SPECS["cfg"]}, grid, Synthetic({"cfg": 3.0}), population(), n_boot=0)
    assert record["settings"]["cfg"]["within_noise"] is None and record["settings"]["cfg"]["paired"][0]["ci"] is None


@pytest.mark.parametrize(
    "select,grid,samples,settings,match",
    [
        ("best", [2.0], 10, SPECS, r"select='best' is invalid: must be one of \['best_w', 'none'\]"),
        ("best_w", [], 10, SPECS, r"w_grid=\[\] is invalid: select=best_w needs a non-empty list"),
        ("best_w", [2.0, 0.5], 10, SPECS, r"w_grid\[1\]=0.5 is invalid: guidance scale must be >= 1"),
        ("best_w", [-1.0], 10, SPECS, r"w_grid\[0\]=-1.0 is invalid"),
        ("best_w", [2.0, 2.0], 10, SPECS, r"w_grid=\[2.0, 2.0\] is invalid: each scale may appear only once"),
        ("best_w", [2.0], 0, SPECS, r"select_samples=0 is invalid"),
        ("best_w", [2.0], 1, SPECS, r"select_samples=1 is invalid: FID needs at least 2 samples"),
        ("best_w", [2.0], 10, {"none": {"rule": "none"}}, r"none of the settings \['none'\] has a guidance scale"),
    ],
)
def test_bad_selection_input(select, grid, samples, settings, match):
    with pytest.raises(ValueError, match=match):
        check_selection(select, grid, samples, settings)


def test_valid_selection_input():
    assert check_selection("best_w", [3, 1, 1.5], 10, SPECS) == [1.0, 1.5, 3.0]  # w = 1 is valid
    assert check_selection("none", [], 0, SPECS) == []  # the grid is not read without a selection


def test_evaluate_picks_w_then_scores_the_pick(evaluation_checkpoint):
    tmp, shards, result = evaluation_checkpoint
    common = ["logger.enabled=false", "grid_size=0", "bootstrap=100"]
    picked = evaluate(
        compose_config(
            "evaluate",
            eval_overrides(
                tmp,
                shards,
                str(result.checkpoint),
                "guidance=[none,cfg]",
                "select=best_w",
                "w_grid=[3,1.5]",
                "select_samples=30",
                f"out_dir={tmp / 'best_w'}",
                *common,
            ),
        )
    )
    saved = json.loads((tmp / "best_w" / "results.json").read_text())
    selection = saved["selection"]
    assert selection["grid"] == [1.5, 3.0] and selection["samples"] == 30 and selection["seed"] == 1
    assert selection["fixed"] == ["none"] and set(selection["settings"]) == {"cfg"}
    cfg = selection["settings"]["cfg"]
    fids = {f["w"]: f["fid"] for f in cfg["fid"]}
    assert cfg["picked"] == min(fids, key=fids.get) and cfg["within_noise"][0] == cfg["picked"]
    rows = {r["setting"]: r for r in saved["rows"]}
    assert rows["cfg"]["scale"] == cfg["picked"] and rows["cfg"]["w_selected_from"] == [1.5, 3.0]
    assert rows["cfg"]["w_selection"]["samples"] == 30 and rows["cfg"]["w_selection"]["picked"] == cfg["picked"]
    assert "w_selected_from" not in rows["none"] and rows["cfg"]["num_samples"] == 40
    # every candidate's full row, on the selection sample, in selection.json
    record = json.loads((tmp / "best_w" / "selection.json").read_text())
    assert {k: v["fid"] for k, v in record["rows"].items()} == {f"cfg@w={w:g}": fids[w] for w in (1.5, 3.0)}
    assert all(r["num_samples"] == 30 for r in record["rows"].values())
    # the final row is the picked w scored on num_samples: what a plain run at that w gives
    plain = evaluate(
        compose_config(
            "evaluate",
            eval_overrides(
                tmp, shards, str(result.checkpoint), "guidance=[cfg]", f"guidance.cfg.scale={cfg['picked']}", *common
            ),
        )
    )
    assert plain["rows"][0]["fid"] == rows["cfg"]["fid"] and picked["rows"][1]["fid"] == rows["cfg"]["fid"]


@pytest.mark.parametrize(
    "extra,match",
    [
        (["guidance=[none]", "select=best_w"], r"select='best_w' is invalid: none of the settings \['none'\]"),
        (["select=best_w", "w_grid=[0.5,2]"], r"w_grid\[0\]=0.5 is invalid"),
        (["select=best"], r"select='best' is invalid"),
    ],
)
def test_bad_selection_fails_before_loading(tmp_path, evaluation_checkpoint, extra, match):
    tmp, shards, _ = evaluation_checkpoint
    overrides = eval_overrides(tmp_path, shards, "nope.ckpt", *extra, "logger.enabled=false")
    with pytest.raises(ValueError, match=match):  # before the (missing) checkpoint is even looked for
        evaluate(compose_config("evaluate", overrides))
