"""The compiled network (``sgexp.models.compiled``): no graph breaks, and the same numbers as eager.

The random draws (label dropout, kept tokens) run eagerly and enter the compiled region as
index tensors, so compiled and eager runs use the same masks bit for bit; only the
floating-point arithmetic may differ (fused kernels sum in another order). Tolerance in
float32 on the CPU, tiny model: ``ATOL`` = 1e-5 absolute on losses, gradients and network
outputs; guided velocities (which multiply branch differences by w) ``ATOL`` + ``RTOL`` = 1e-5
relative (``torch.testing.assert_close``).
Equality tests use the ``aot_eager`` backend (the graph dynamo captures, with autograd
traced ahead of time, run by eager kernels: seconds); one test runs inductor itself.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import lightning
import pytest
import torch
from conftest import randomize

from sgexp.config import OptimConfig, use_compile
from sgexp.diffusion import FlowMatching, cfg, cfg_sparse_guidance, sparse_guidance, unguided
from sgexp.diffusion.guidance import evaluate
from sgexp.diffusion.guided_step import guided_passes
from sgexp.diffusion.seeds import routing_generators
from sgexp.lit.module import FlowMatchingModule
from sgexp.models import DiT, DiTConfig
from sgexp.models.dit import denoise

ATOL = RTOL = 1e-5  # float32, CPU; observed: aot_eager ~1e-7, inductor up to ~1e-5 on an SG step at w=3
RULES = {
    "none": unguided(),
    "cfg": cfg(1.5),
    "sg": sparse_guidance(3.0, 0.5, 0.75),
    "cfg_sg": cfg_sparse_guidance(1.5, 0.0, 0.5),
}


def micro() -> DiT:
    """SiT-Micro/4 on 16×16×3 inputs: 16 tokens, depth 4, width 64, route 1→2 at γ_train 0.5."""
    config = DiTConfig.from_name("SiT-Micro/4", input_size=16, in_channels=3, num_classes=5)
    return randomize(DiT(config))


def inputs(batch: int = 4):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 16, 16, generator=gen)
    return x, torch.rand(batch, generator=gen), torch.tensor([0, 1, 4, 2])[:batch]


def explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def test_forward_and_guided_step_trace_without_graph_breaks():
    model, (x, t, y) = micro(), inputs()
    gen = torch.Generator().manual_seed(0)
    # Routed training forward: train mode, routing at γ_train, labels dropped, draws taken eagerly.
    model.train()
    dropped = model.y_embedder.drop(y, gen)
    keep = model.choose_tokens(x.shape[0], None, gen, device=x.device)
    assert keep[0].shape == (4, 8)  # 16 − floor(16·0.5) kept tokens: a static shape
    checks = {"train routed": explain(denoise, model, x, t, dropped, keep)}
    # Dense eval forward.
    model.eval()
    checks["eval dense"] = explain(denoise, model, x, t, y, model.choose_tokens(x.shape[0]))
    # Guided steps: CFG batched (one forward over 2B), SG with the shared prefix.
    null = torch.full_like(y, model.null_label)
    dense = model.choose_tokens(x.shape[0])
    weights = torch.tensor([1.5])
    checks["cfg step"] = explain(guided_passes, model, x, t, [null, y], [dense, dense], 0, weights)
    gens = routing_generators(range(4), 0)
    sparse = [model.choose_tokens(4, g, gens, device=x.device, first_block=1) for g in (0.75, 0.5)]
    checks["sg step"] = explain(guided_passes, model, x, t, [y, y], sparse, 1, weights)
    for name, result in checks.items():
        assert result.graph_break_count == 0, (name, result.break_reasons)
        assert result.graph_count == 1, name
    # The CFG graph runs the network once, on both halves together.
    cfg_graph = checks["cfg step"].graphs[0]
    patch_embeds = [n for n in cfg_graph.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    assert len(patch_embeds) == 1


def _loss_and_grads(model: DiT, seed: int = 3):
    x, _, y = inputs()
    model.train().zero_grad(set_to_none=True)
    loss = FlowMatching().loss(model, x, y, generator=torch.Generator().manual_seed(seed))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_compiled_training_step_matches_eager_with_the_same_masks():
    eager, compiled = micro(), micro().compile_core(backend="aot_eager")
    torch._dynamo.reset()
    for seed in (3, 4):  # a second step: another mask, the same graph
        loss_e, grads_e = _loss_and_grads(eager, seed)
        loss_c, grads_c = _loss_and_grads(compiled, seed)
        assert abs(loss_e.item() - loss_c.item()) < ATOL and _max_diff(grads_e, grads_c) < ATOL
    assert loss_e.item() > 0 and max(g.abs().max().item() for g in grads_e.values()) > 1e-3
    # Compile off is the eager path itself: bit-identical to a model that never compiled.
    compiled.compile_core(backend=None)
    assert torch.equal(_loss_and_grads(compiled, 4)[0], loss_e)


@pytest.mark.parametrize("name", list(RULES))
def test_compiled_guided_step_matches_eager(name):
    rule, (x, _, y) = RULES[name], inputs()
    eager, compiled = micro().eval(), micro().eval().compile_core(backend="aot_eager")
    torch._dynamo.reset()
    outputs = []
    for model in (eager, compiled):
        gens = routing_generators(range(4), 7)
        with torch.no_grad():
            outputs.append([evaluate(rule, {"main": model}, x, t, y, i, 4, gens) for i, t in enumerate((0.9, 0.6))])
    for e, c in zip(*outputs, strict=True):
        torch.testing.assert_close(c, e, atol=ATOL, rtol=RTOL)
    assert (outputs[0][0] - outputs[0][1]).abs().max() > 1e-3  # different t, different masks: not trivial


@pytest.mark.slow  # inductor builds C++ kernels with gcc: 1-4 min on 2 shared cores
def test_inductor_compiles_training_and_sg_step_to_the_eager_numbers():
    """The real backend once (C++ kernels from gcc): a training step and an SG step."""
    eager, compiled = micro(), micro().compile_core(backend="inductor")
    torch._dynamo.reset()
    start = time.perf_counter()
    loss_c, grads_c = _loss_and_grads(compiled)
    loss_e, grads_e = _loss_and_grads(eager)
    assert abs(loss_e.item() - loss_c.item()) < ATOL and _max_diff(grads_e, grads_c) < ATOL
    x, _, y = inputs()
    rule = RULES["sg"]
    with torch.no_grad():
        v = [
            evaluate(rule, {"main": m.eval()}, x, 0.5, y, 0, 1, routing_generators(range(4), 1))
            for m in (eager, compiled)
        ]
    torch.testing.assert_close(v[1], v[0], atol=ATOL, rtol=RTOL)
    print(f"inductor: training + SG step compiled and run in {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- trainer.compile


def fit_briefly(module: FlowMatchingModule, steps: int, callbacks=()) -> lightning.Trainer:
    """``steps`` training steps of ``module`` on random 16×16×3 images (5 classes), batch 8, on the CPU."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8 * steps, 3, 16, 16, generator=gen), torch.randint(5, (8 * steps,), generator=gen)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    data = torch.utils.data.TensorDataset(images, labels)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return trainer


def test_trainer_compile_resolves_per_device_and_rejects_bad_values():
    assert use_compile(None, "default", "cuda") and use_compile("auto", "default", "cuda")
    assert not use_compile(None, "default", "cpu") and not use_compile("auto", "reduce-overhead", "cpu")
    assert use_compile(True, "default", "cpu") and not use_compile(False, "default", "cuda")
    with pytest.raises(ValueError, match="trainer.compile"):
        use_compile("yes", "default", "cpu")
    with pytest.raises(ValueError, match="trainer.compile_mode.*reduce-overhead"):
        use_compile(True, "fast", "cpu")
    with pytest.raises(ValueError, match="trainer.compile"):
        FlowMatchingModule(micro().config.to_dict(), compile=1)


def test_checkpoints_with_the_old_optim_compile_key_still_load(tmp_path):
    """``compile`` moved from ``optim`` to ``trainer``: a checkpoint that stored it under optim loads."""
    network = micro().config.to_dict()
    module = FlowMatchingModule(network, OptimConfig(lr=3e-4), seed=2)
    old_optim = {**asdict(module.optim), "compile": True}
    state = {
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "hparams_name": "kwargs",
        "hyper_parameters": {"model": network, "optim": old_optim, "seed": 2, "dataset": None},
    }
    torch.save(state, tmp_path / "old.ckpt")
    loaded = FlowMatchingModule.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu", weights_only=True)
    assert loaded.optim == module.optim and "compile" not in loaded.hparams.optim
    assert not hasattr(OptimConfig(), "compile")
    with pytest.raises(TypeError, match="unexpected arguments \\['lrr'\\]"):
        FlowMatchingModule(network, lrr=1.0, compile=None)


@pytest.mark.slow  # inductor on the CPU: 1-4 min
def test_training_with_compile_logs_the_compile_time_once():
    module = FlowMatchingModule(micro().config.to_dict(), OptimConfig(lr=1e-3), compile=True)
    trainer = fit_briefly(module, steps=7)
    assert (
        module.model.compile_options == module.ema.model.compile_options == {"backend": "inductor", "mode": "default"}
    )
    compile_s = trainer.callback_metrics["train/compile_s"].item()
    assert compile_s > 1.0  # compiling fwd+bwd takes seconds; a step of this model milliseconds
