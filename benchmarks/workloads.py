"""The timed workloads, shared by the CPU benchmarks and the GPU script.

A training step is forward + flow-matching loss + backward (what the FLOPs
model prices: backward ≈ 2× forward, for dense and routed alike); the
optimizer update is left out because its cost does not depend on routing. A
sampling step is one ``guidance.evaluate`` call (every pass of the rule at one
time t) with per-image routing generators, as ``generate`` runs it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks import timing
from sgexp.diffusion import FlowMatching, Guidance, cfg, cfg_sparse_guidance, sparse_guidance, unguided
from sgexp.diffusion.guidance import evaluate
from sgexp.diffusion.seeds import routing_generators
from sgexp.flops import pass_macs, step_macs
from sgexp.models import DiT, DiTConfig, build_model


@dataclass(frozen=True)
class Workload:
    """A model size at an input size: ``SiT-S/4`` on 32×32×4 latents, 1000 classes."""

    name: str
    input_size: int = 32
    channels: int = 4
    num_classes: int = 1000

    def config(self, gamma: float = 0.5) -> DiTConfig:
        """The size's default TREAD route at γ_train = ``gamma``."""
        return DiTConfig.from_name(
            self.name,
            input_size=self.input_size,
            in_channels=self.channels,
            num_classes=self.num_classes,
            train_sparsity=gamma,
        )

    def label(self) -> str:
        config = self.config()
        r = config.routes[0]
        return f"{self.name} {self.input_size}²×{self.channels} ({config.num_tokens} tok, route {r.start}→{r.end})"


# Autocast dtypes the scripts accept (--amp), and the CPU sizes/batches where the dense model is
# compute-bound on 2 cores (step time proportional to batch).
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_DEFAULTS: list[tuple[Workload, list[int]]] = [
    (Workload("SiT-Tiny/4"), [32, 128]),
    (Workload("SiT-S/4"), [16]),
]


def parse_workload(spec: str) -> Workload:
    """``"SiT-S/4"`` or ``"SiT-S/4@32x4"`` (input size and channels)."""
    name, _, shape = spec.partition("@")
    if not shape:
        return Workload(name)
    size, _, channels = shape.partition("x")
    return Workload(name, int(size), int(channels or 4))


def build(workload: Workload, gamma: float, device: torch.device, seed: int = 0) -> DiT:
    """The model with random (non-zero) weights: adaLN-Zero's zero init would make
    every block the identity, and nothing about timing should depend on that."""
    torch.manual_seed(seed)
    with torch.device(device):  # built in place: XL/2's 675M parameters initialise in seconds on a GPU
        model = build_model(
            workload.name,
            input_size=workload.input_size,
            in_channels=workload.channels,
            num_classes=workload.num_classes,
            train_sparsity=gamma,
        )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (GPU MFU), a no-op context otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def inputs(workload: Workload, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, workload.channels, workload.input_size, workload.input_size, generator=gen)
    y = torch.randint(workload.num_classes, (batch,), generator=gen)
    return x.to(device), y.to(device)


def train_step(
    model: DiT, x0: torch.Tensor, labels: torch.Tensor, routed: bool, amp: torch.dtype | None = None
) -> Callable[[], None]:
    """Forward + loss + backward, routed at γ_train or dense (the same weights and draws).

    A device generator, as in ``SiTModule.step_generator``: routing masks are drawn
    where the activations live.
    """
    device = x0.device
    objective = FlowMatching()
    generator = torch.Generator(device=device).manual_seed(0)
    sparsity = None if routed else 0.0  # None: γ_train in training mode

    def step() -> None:
        model.train()  # per call: closures of other workloads may share the model
        model.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss = objective.loss(model, x0, labels, generator=generator, sparsity=sparsity)
        loss.backward()

    return step


def train_macs(config: DiTConfig, gamma: float, include_attention: bool = True) -> float:
    """Multiply-accumulates of forward + backward per image: 3× the forward pass."""
    return 3.0 * pass_macs(config, gamma, include_attention)


# The rules the sampling benchmarks compare; scale 1.5 runs two passes per step.
SAMPLING_RULES: dict[str, Guidance] = {
    "none": unguided(),
    "cfg": cfg(1.5),
    "sg": sparse_guidance(1.5, 0.5, 0.9),
    "sg_unshared": sparse_guidance(1.5, 0.5, 0.9, share_prefix=False),
    "cfg_sg": cfg_sparse_guidance(1.5, 0.0, 0.5),
}


def sampling_step(
    rule: Guidance, model: DiT, x: torch.Tensor, labels: torch.Tensor, amp: torch.dtype | None = None
) -> Callable[[], torch.Tensor]:
    """One guided velocity evaluation at t = 0.5 (step 20 of 40), no gradients."""
    generators = routing_generators(range(x.shape[0]), base_seed=0)

    def step() -> torch.Tensor:
        model.eval()  # per call: closures of other workloads may share the model
        with torch.no_grad(), autocast(x.device, amp):
            return evaluate(rule, {"main": model}, x, 0.5, labels, 20, 40, generator=generators)

    return step


def rule_macs(config: DiTConfig, rule: Guidance, include_attention: bool = True) -> float:
    """Multiply-accumulates of one evaluation of ``rule`` per image, sharing as the rule runs."""
    return step_macs({"main": config}, rule.passes(20, 40, 0.5), rule.share_prefix, include_attention)


def prefix_sharing_gain(stats: dict, config: DiTConfig, rules: dict[str, Guidance]) -> dict | None:
    """SG with vs without prefix sharing, from one interleaved run: time and FLOPs ratios, realised fraction."""
    if "sg" not in rules or "sg_unshared" not in rules:
        return None
    ratio = timing.paired_ratio(stats["sg"], stats["sg_unshared"])
    analytic = rule_macs(config, rules["sg"]) / rule_macs(config, rules["sg_unshared"])
    return {
        "time_ratio": ratio.to_dict(),
        "flops_ratio": analytic,
        "saving_realised_fraction": timing.realised_fraction(ratio.median, analytic),
    }
