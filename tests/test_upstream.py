"""Official DiT, SiT and TREAD checkpoints: ``sgexp.models.upstream`` and ``python -m sgexp.convert``
reproduce the outputs the official code stored in ``shared/fixtures/upstream`` (its README
explains every field), in sgexp's conventions."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import torch

from sgexp import runs
from sgexp.convert import convert
from sgexp.convert import main as convert_main
from sgexp.lit.module import FlowMatchingModule
from sgexp.models import DiT, DiTConfig
from sgexp.models.upstream import convert_state_dict, load_upstream, read_state_dict

FIXTURES = Path(
    os.environ.get("SGEXP_UPSTREAM_FIXTURES") or Path(__file__).resolve().parents[2] / "shared/fixtures/upstream"
)
pytestmark = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"upstream fixtures not found at {FIXTURES} (set SGEXP_UPSTREAM_FIXTURES)"
)
ATOL = 1e-5
HEADS = 4  # every fixture's num_heads (not in the weights)
TREAD_ROUTES = [(1, 2, 0.5)]


def fixture(kind: str) -> dict:
    return torch.load(FIXTURES / f"{kind}_official_tiny.pt", weights_only=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def test_dit_is_an_epsilon_network_at_t_over_1000():
    f = fixture("dit")
    model = load_upstream("dit", f["state_dict"], num_heads=HEADS)
    assert model.config.prediction == "epsilon" and not model.training
    assert max_diff(model(f["x"], f["t"] / 1000, f["y"]), f["out"][:, :4]) < ATOL  # ε; variance channels dropped


@torch.no_grad()
def test_sit_runs_in_sgexp_time_and_velocity():
    f = fixture("sit")
    model = load_upstream("sit", f["state_dict"], num_heads=HEADS)
    assert model.config.prediction == "velocity"
    # SiT: t = 0 is noise, u = x_data − noise; sgexp: t = 1 is noise, v = ε − x₀.
    assert max_diff(model(f["x"], 1 - f["t"], f["y"]), -f["out"]) < ATOL
    assert max_diff(model(f["x"], 1 - f["t"], f["y"]), -f["out_with_sigma"][:, :4]) < ATOL


@torch.no_grad()
def test_tread_dense_routed_cfg_and_edm():
    f = fixture("tread")
    model = load_upstream("tread", f["state_dict"], num_heads=HEADS, routes=TREAD_ROUTES)
    x, t, y = f["x"], f["t"], f["y"]
    assert max_diff(model(x, t, y), f["out_dense"]) < ATOL
    assert max_diff(model(x, t, y, keep=f["ids_keep"]), f["out_routed"]) < ATOL
    assert max_diff(model(x, t, y, keep=f["ids_keep"]), f["out_dense"]) > 1e-3  # routing changes the output
    null = torch.full_like(y, model.null_label)
    cond, uncond = model(x, t, y), model(x, t, null)
    assert max_diff(uncond + f["cfg_scale"] * (cond - uncond), f["out_cfg"]) < ATOL
    # EDM wrapper: D = c_skip·x + c_out·F(c_in·x, ln σ / 4).
    e = f["edm"]
    s, sd = e["sigma"].view(-1, 1, 1, 1), e["sigma_data"]
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    F = model(c_in * e["x"], e["sigma"].log() / 4, e["y"])
    assert max_diff(c_skip * e["x"] + c_out * F, e["D_x"]) < ATOL


@torch.no_grad()
def test_tread_guided_step_with_two_route_selections():
    """One step of TREAD's sample_tread: both passes unconditional, kept 12 and 5 of 16 tokens."""
    g = fixture("tread")["guided_step"]
    model = load_upstream("tread", fixture("tread")["state_dict"], num_heads=HEADS, routes=TREAD_ROUTES)
    null = torch.full_like(g["y"], model.null_label)
    v1 = model(g["z"], g["t"], null, keep=g["ids_keep_1"])
    v2 = model(g["z"], g["t"], null, keep=g["ids_keep_2"])
    assert max_diff(v1, g["v1"]) < ATOL and max_diff(v2, g["v2"]) < ATOL
    assert max_diff(g["z"] - g["dt"] * (v2 + g["cfg_scale"] * (v1 - v2)), g["z_out"]) < ATOL


def dense_outputs(kind: str, model: DiT, f: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sgexp output, the upstream output it must equal) on the fixture's inputs."""
    if kind == "dit":
        return model(f["x"], f["t"] / 1000, f["y"]), f["out"][:, :4]
    if kind == "sit":
        return model(f["x"], 1 - f["t"], f["y"]), -f["out"]
    return model(f["x"], f["t"], f["y"]), f["out_dense"]


def upstream_files(tmp: Path) -> list[tuple[str, Path]]:
    """Each kind's state dict written as the official code writes its checkpoints."""
    dit, sit, tread = (fixture(k)["state_dict"] for k in ("dit", "sit", "tread"))
    noise = {k: torch.randn_like(v) for k, v in sit.items()}  # the raw weights, which the EMA must win over
    edm = {f"model.{k}": v for k, v in tread.items()}
    files = {
        "dit_released.pt": dit,  # a bare state dict
        "sit_train.pt": {"model": noise, "ema": sit, "opt": {}, "args": argparse.Namespace(model="SiT-XL/2")},
        "tread_train.pt": {"model_state_dict": edm, "ema_state_dict": edm, "optimizer_state_dict": {}, "step": 7},
    }
    for name, obj in files.items():
        torch.save(obj, tmp / name)
    return [("dit", tmp / "dit_released.pt"), ("sit", tmp / "sit_train.pt"), ("tread", tmp / "tread_train.pt")]


@torch.no_grad()
def test_checkpoint_file_layouts_load(tmp_path):
    for kind, path in upstream_files(tmp_path):
        f = fixture(kind)
        model = load_upstream(kind, path, num_heads=HEADS, routes=TREAD_ROUTES if kind == "tread" else None)
        assert max_diff(*dense_outputs(kind, model, f)) < ATOL, path.name
    raw = read_state_dict(tmp_path / "sit_train.pt", use_ema=False)  # --no-ema: the "model" entry
    assert not torch.equal(raw["x_embedder.proj.weight"], fixture("sit")["state_dict"]["x_embedder.proj.weight"])


def test_inferred_config_and_registry_defaults():
    state = fixture("tread")["state_dict"]
    config = load_upstream("tread", state, num_heads=HEADS, routes=["1:2@0.5"]).config
    assert (config.input_size, config.in_channels, config.patch_size) == (8, 4, 2)
    assert (config.hidden_size, config.depth, config.num_classes, config.mlp_ratio) == (32, 4, 10, 4.0)
    assert (config.time_scale, config.time_reversed, config.output_sign, config.pos_embed) == (1.0, False, 1, "stored")
    tread_dict = {"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}
    assert load_upstream("tread", state, num_heads=HEADS, routes=[tread_dict]).config.routes == config.routes
    assert load_upstream("tread", state, num_heads=HEADS, routes=[]).config.routes == ()
    # A registry name supplies the official heads (and TREAD's route 2 -> L-4); the weights must fit it.
    with torch.device("meta"):
        big = DiT(DiTConfig(input_size=8, in_channels=4, hidden_size=384, depth=12, num_heads=6, pos_embed="stored"))
        state = {k.replace("y_embedder.table", "y_embedder.embedding_table"): v for k, v in big.state_dict().items()}
    named = convert_state_dict("tread", state, model="DiT-S/2")[0]
    assert (named.num_heads, [(r.start, r.end, r.sparsity) for r in named.routes]) == (6, [(2, 8, 0.5)])


@pytest.mark.parametrize(
    "kind,edit,kwargs,match",
    [
        ("sit", None, {"num_heads": 5}, "num_heads=5 is invalid: must divide the width 48"),
        ("sit", None, {}, "num_heads=None is invalid: the weights do not determine it"),
        ("tread", None, {"num_heads": 4}, "routes=None is invalid"),
        ("dit", "truncate", {"num_heads": 4}, r"blocks\.2\.mlp\.fc2\.bias: missing from the checkpoint .*\(64,\)"),
        ("dit", "drop_table", {"num_heads": 4}, "missing key 'y_embedder.embedding_table.weight'"),
        ("tread", "extra", {"num_heads": 4, "routes": []}, "blocks.0.attn.q_norm.weight: unexpected key"),
        (
            "sit",
            None,
            {"model": "SiT-S/2"},
            r"pos_embed: checkpoint shape \(1, 16, 48\), model='SiT-S/2' expects \(1, 16, 384\)",
        ),
        ("sit", "bad_head", {"num_heads": 4}, r"final_layer\.linear\.weight: checkpoint shape \(20, 48\)"),
        ("tread", None, {"num_heads": 4, "routes": [(1, 9, 0.5)]}, "route blocks must lie in 0..3"),
    ],
)
def test_mismatches_fail_naming_the_key(kind, edit, kwargs, match):
    state = dict(fixture(kind)["state_dict"])
    if edit == "truncate":
        del state["blocks.2.mlp.fc2.bias"]  # a file cut short inside the last block
    elif edit == "drop_table":
        del state["y_embedder.embedding_table.weight"]
    elif edit == "extra":
        state["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    elif edit == "bad_head":
        state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:20]
    with pytest.raises(ValueError, match=match):
        load_upstream(kind, state, **kwargs)


def test_keep_is_checked():
    state = fixture("tread")["state_dict"]
    model = load_upstream("tread", state, num_heads=HEADS, routes=TREAD_ROUTES)
    x, t, y = torch.zeros(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    for keep, match in [
        ([], r"keep=.* need one \(B, K\) index tensor per route \(1\)"),
        ([torch.zeros(2, 3)], r"keep\[0\]=\(2, 3\) is invalid: must be a \(2, K\) int64"),
        ([torch.tensor([[0, 16], [1, 2]])], r"indices in \[0, 16\)"),
        ([torch.tensor([[0, 0], [1, 2]])], "distinct"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(x, t, y, keep=keep)


def test_new_config_fields_keep_old_configs_and_checkpoints_working():
    old = {k: v for k, v in DiTConfig(routes=()).to_dict().items()}
    for key in ("time_scale", "time_reversed", "output_sign", "pos_embed", "prediction"):
        old.pop(key)
    config = DiTConfig.from_dict(old)  # a config dict written before these fields existed
    assert (config.time_scale, config.time_reversed, config.output_sign) == (1000.0, False, 1)
    assert (config.pos_embed, config.prediction) == ("sincos", "velocity")
    sit = load_upstream("sit", fixture("sit")["state_dict"], num_heads=HEADS).config
    assert DiTConfig.from_dict(sit.to_dict()) == sit
    with torch.device("meta"):
        assert "pos_embed" not in DiT(DiTConfig(routes=())).state_dict()  # recomputed, as before
        assert "pos_embed" in DiT(sit).state_dict()
    for name, value in [("output_sign", 2), ("pos_embed", "learned"), ("prediction", "x0"), ("time_scale", 0)]:
        with pytest.raises(ValueError, match=f"{name}="):
            DiTConfig(**{name: value})


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert")
    _, _, (_, tread_file) = upstream_files(tmp)
    out = tmp / "run" / "checkpoints" / "last.ckpt"
    out = convert("tread", tread_file, out, num_heads=HEADS, routes=["1:2@0.5"], dataset="toy", data_dir=tmp / "shards")
    return tmp, tread_file, out


@torch.no_grad()
def test_convert_writes_a_checkpoint_that_loads_and_reproduces_tread(converted):
    _, _, out = converted
    assert runs.open_checkpoint(out)["global_step"] == 0
    module = FlowMatchingModule.load_from_checkpoint(out, map_location="cpu")
    assert module.hparams.dataset == "toy" and module.config.routes[0].sparsity == 0.5
    f = fixture("tread")
    for net in (module.ema.model, module.model.eval()):
        assert max_diff(net(f["x"], f["t"], f["y"]), f["out_dense"]) < ATOL
        assert max_diff(net(f["x"], f["t"], f["y"], keep=f["ids_keep"]), f["out_routed"]) < ATOL
    assert not math.isnan(float(module.ema.model(f["x"], f["t"], f["y"], sparsity=0.5).sum()))


def test_convert_command_line_errors(converted, tmp_path, capsys):
    tmp, tread_file, out = converted
    meta = tmp_path / "shards" / "digits" / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text('{"resolution": 8, "channels": 1, "num_classes": 10}')
    base = ["--from", "tread", "--checkpoint", str(tread_file), "--num-heads", "4", "--routes", "1:2@0.5"]
    for argv, message in [
        ([*base, "--out", str(out)], "exists already (pass --force"),
        ([*base, "--out", str(tmp_path / "x.pt")], "must be a file path ending in .ckpt"),
        ([*base[:-1], "1-2", "--out", str(tmp_path / "x.ckpt")], "route='1-2' is invalid"),
        ([*base, "--out", str(tmp_path / "x.ckpt"), "--model", "SiT-Q/2"], "not allowed with argument --num-heads"),
        ([*base[:4], "--model", "SiT-Q/2", "--out", str(tmp_path / "x.ckpt")], "model='SiT-Q/2' is invalid"),
        (
            [*base, "--out", str(tmp_path / "x.ckpt"), "--dataset", "digits", "--data-dir", str(tmp_path / "shards")],
            "--dataset='digits' is invalid: its channels is 1 but the checkpoint's in_channels is 4",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            convert_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, argv
    assert not (tmp_path / "x.ckpt").exists()
