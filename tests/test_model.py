"""DiT/SiT backbone: registry, shapes, initialisation, embeddings, bad input."""

from __future__ import annotations

import pytest
import torch

from sgexp.models import MODEL_SIZES, DiT, DiTConfig, build_model, parse_model_name
from sgexp.models.layers import LabelEmbedder, sincos_2d


@pytest.mark.parametrize(
    "size,depth,width,heads",
    [("S", 12, 384, 6), ("B", 12, 768, 12), ("L", 24, 1024, 16), ("XL", 28, 1152, 16)],
)
def test_registry_sizes(size, depth, width, heads):
    for prefix in ("SiT", "DiT"):
        spec, patch = parse_model_name(f"{prefix}-{size}/2")
        assert (spec.depth, spec.hidden_size, spec.num_heads, patch) == (depth, width, heads, 2)
    assert spec.route == (2, depth - 4)  # TREAD's default span


def test_xl2_parameter_count():
    with torch.device("meta"):
        model = build_model("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    # DiT-XL/2 has 675M parameters (its learn_sigma output head adds 18k more than ours).
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(675e6, rel=0.002)


@pytest.mark.parametrize(
    "name,size,channels",
    [("SiT-Tiny/4", 28, 1), ("SiT-Micro/1", 8, 3), ("SiT-Micro/2", 16, 4), ("DiT-Micro/8", 32, 2)],
)
def test_output_shape_matches_input(name, size, channels):
    model = build_model(name, input_size=size, in_channels=channels, num_classes=10)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.rand(2), torch.tensor([3, 10]))
    assert out.shape == x.shape
    assert model(x, 0.5, torch.tensor([1, 2])).shape == x.shape  # a scalar t broadcasts


def test_adaln_zero_init_predicts_zero():
    model = build_model("SiT-Micro/2", input_size=8, in_channels=3, num_classes=4)
    out = model(torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 4]))
    assert torch.equal(out, torch.zeros_like(out))
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0  # but the blocks themselves are initialised


def test_unpatchify_inverts_patch_order():
    model = build_model("SiT-Micro/4", input_size=16, in_channels=3, num_classes=2)
    x = torch.randn(2, 3, 16, 16)
    p, h = 4, 4
    tokens = x.reshape(2, 3, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(2, h * h, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)


def test_positional_embedding():
    emb = sincos_2d(64, 4)
    assert emb.shape == (16, 64)
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0.1  # all positions distinct
    model = build_model("SiT-Micro/2", input_size=8, in_channels=1, num_classes=2)
    assert model.pos_embed.shape == (1, 16, 64)
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, not learned


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.3)
    labels = torch.full((4000,), 3)
    null = embedder.table.weight[10]
    dropped = (embedder.train()(labels) == null).all(dim=1).float().mean().item()
    assert dropped == pytest.approx(0.3, abs=0.03)
    assert not (embedder.eval()(labels) == null).all(dim=1).any()
    assert build_model("SiT-Micro/2", input_size=8, in_channels=1, num_classes=7).null_label == 7


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: build_model("SiT-XXL/2", input_size=32, in_channels=4, num_classes=10), r"model='SiT-XXL/2'"),
        (lambda: build_model("SiT-XL/3", input_size=30, in_channels=4, num_classes=10), r"patch in \[1, 2, 4, 8\]"),
        (lambda: build_model("ViT-B/2", input_size=32, in_channels=4, num_classes=10), r"model='ViT-B/2'"),
        (lambda: build_model("SiT-B/4", input_size=30, in_channels=4, num_classes=10), r"input_size=30 .*patch_size=4"),
        (lambda: DiTConfig(hidden_size=100, num_heads=16), r"hidden_size=100 .*num_heads=16"),
        (lambda: DiTConfig(num_classes=0), r"num_classes=0 is invalid"),
        (lambda: DiTConfig(class_dropout_prob=1.0), r"class_dropout_prob=1.0"),
        (
            lambda: DiTConfig.from_name("SiT-B/2", input_size=32, in_channels=4, num_classes=10, routes="tread"),
            "routes",
        ),
    ],
)
def test_bad_model_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_small_sizes_are_registered():
    assert {"Micro", "Tiny"} <= set(MODEL_SIZES)
    model = DiT(DiTConfig.from_name("SiT-Tiny/4", input_size=28, in_channels=1, num_classes=10))
    assert model.config.num_tokens == 49 and model.routes[0].start == 1 and model.routes[0].end == 6
    # the route covers >= 75% of the depth, as 2->24 of SiT-XL/2's 28 blocks (issue 14: SG(0.5, 0.9) < one dense pass)
    route = model.routes[0]
    assert (route.end - route.start + 1) / model.config.depth >= 0.75
