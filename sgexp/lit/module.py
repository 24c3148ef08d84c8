"""LightningModule: flow-matching training of a TREAD-routed DiT with EMA.

The maths lives in ``sgexp.models`` and ``sgexp.diffusion``; this module only
wires it to Lightning: the loss (routing on at γ_train, label dropout inside the
label embedder), AdamW with linear warmup, the EMA copy used for validation and
sampling, and the checks that stop a diverging run.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch

from sgexp.checks import fail
from sgexp.diffusion.flow import FlowMatching
from sgexp.diffusion.seeds import index_seed
from sgexp.lit.ema import EMA
from sgexp.models.dit import DiT, DiTConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


class FlowMatchingModule(L.LightningModule):
    """Trains ``DiT(model)`` with the flow-matching objective.

    Arguments are plain values (saved as hyper-parameters, so
    ``FlowMatchingModule.load_from_checkpoint(path)`` rebuilds the network):
    ``model`` is a ``DiTConfig.to_dict()``; ``lr``, ``betas``, ``weight_decay``
    configure AdamW; the learning rate ramps linearly over ``warmup_steps`` and
    then stays constant (the SG paper uses no schedule). ``dataset`` names the
    prepared dataset it was trained on, so evaluation finds its reference data.
    """

    def __init__(
        self,
        model: dict,
        lr: float = 1e-4,
        betas: Sequence[float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        ema_decay: float = 0.9999,
        ema_warmup: bool = True,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        compile: bool = False,
        seed: int = 0,
        dataset: str | None = None,
    ):
        super().__init__()
        if not lr > 0:
            raise fail("lr", lr, "must be > 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise fail("betas", betas, "must be two numbers in [0, 1)")
        if warmup_steps < 0:
            raise fail("warmup_steps", warmup_steps, "must be >= 0")
        self.save_hyperparameters()
        self.config = DiTConfig.from_dict(dict(model))
        self.model = DiT(self.config)
        self.ema = EMA(self.model, ema_decay, ema_warmup)
        self.objective = FlowMatching(t_mean, t_std)
        if compile:
            self.model.compile()  # in place: state_dict keys are unchanged

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """All randomness of a training step (t, ε, routing masks, label dropout) comes from a
        generator seeded by (seed, global step, rank, micro-batch): a resumed run replays
        exactly the steps an uninterrupted run would have taken, without saving RNG state."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        stream = (1 + self.global_rank) * 1000 + micro
        seed = index_seed(self.hparams.seed, self.global_step, stream)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch  # (B, C, H, W) in [-1, 1], (B,)
        # Train mode: routed at γ_train, labels dropped with class_dropout_prob.
        loss = self.objective.loss(self.model, images, labels, generator=self.step_generator(batch_idx))
        finite = bool(torch.isfinite(loss))
        # Every rank must stop together, or the others would hang in the next all-reduce.
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping. "
                "The last checkpoint on disk is the last good one: lower lr, raise warmup_steps or "
                "enable gradient clipping, then resume from it."
            )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Flow-matching loss of the EMA model (dense), with timesteps and noise fixed per batch."""
        images, labels = batch
        generator = torch.Generator(device=images.device).manual_seed(batch_idx)
        loss = self.objective.loss(self.ema.model, images, labels, generator=generator)
        self.log("val/loss", loss, sync_dist=True, batch_size=images.shape[0])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Before clipping: the norm that tells whether clipping is active.
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads)
        # Gradients are already all-reduced, so every rank takes the same decision. Stopping
        # here, before the update, keeps the weights (and the last checkpoint) finite.
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"non-finite gradient norm ({grad_norm.item()}) at step {self.global_step}; stopping "
                "before the update. The last checkpoint on disk is the last good one."
            )
        self.log("train/grad_norm", grad_norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        warmup = max(hp.warmup_steps, 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
