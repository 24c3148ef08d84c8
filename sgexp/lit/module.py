"""LightningModule: flow-matching training of a TREAD-routed DiT with EMA.

The maths lives in ``sgexp.models`` and ``sgexp.diffusion``, the optimizer and its schedule in
``sgexp.config.OptimConfig``; this module only wires them to Lightning: the loss (routing on at γ_train,
label dropout inside the label embedder), the EMA copy used for validation and sampling, and the checks
that stop a diverging run.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import lightning as L
import torch

from sgexp.config import OptimConfig, use_compile
from sgexp.diffusion.flow import FlowMatching
from sgexp.diffusion.seeds import index_seed
from sgexp.lit.ema import EMA
from sgexp.models.dit import DiT, DiTConfig

OPTIM_FIELDS = tuple(f.name for f in fields(OptimConfig))
LEGACY_OPTIM_KEYS = ("compile",)
WARM_STEPS = 5  # steps after the first whose median is the steady step time (compile_s)
log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is the last good one."""


def optim_config(optim: OptimConfig | Mapping[str, Any] | None, flat: Mapping[str, Any]) -> OptimConfig:
    """``optim`` as an ``OptimConfig`` (None: the schema's defaults).

    ``flat``: the optimizer settings of checkpoints written before they were grouped under ``optim``
    (hyper-parameters ``lr=..., betas=..., ema_decay=...`` beside ``model``), folded in so that
    ``load_from_checkpoint`` still rebuilds those runs with their own settings.
    """
    # ``compile`` moved to ``trainer.compile`` (a property of the run, not of the optimizer); checkpoints
    # written before still carry it, under ``optim`` or flat: it is dropped, training compiles as trainer says.
    flat = {k: v for k, v in flat.items() if k not in LEGACY_OPTIM_KEYS}
    if optim is not None and not isinstance(optim, OptimConfig):
        optim = {k: v for k, v in dict(optim).items() if k not in LEGACY_OPTIM_KEYS}
    unknown = sorted(set(flat) - set(OPTIM_FIELDS))
    if unknown:
        raise TypeError(f"FlowMatchingModule got unexpected arguments {unknown}")
    if flat and optim is not None:
        raise TypeError(f"FlowMatchingModule got optim and the flat optimizer arguments {sorted(flat)}: give optim")
    if isinstance(optim, OptimConfig):
        return optim
    return OptimConfig(**dict(optim or {}), **flat)


class FlowMatchingModule(L.LightningModule):
    """Trains ``DiT(model)`` with the flow-matching objective.

    ``model`` is a ``DiTConfig.to_dict()``; ``optim`` an ``OptimConfig`` (or its fields as a mapping;
    None: the defaults); ``seed`` seeds every training step (``step_generator``); ``dataset`` names the
    prepared dataset it was trained on, so evaluation finds its reference data. ``compile`` and
    ``compile_mode``: ``trainer.compile``/``compile_mode`` (``sgexp.config.use_compile``), resolved for the
    device when fitting starts; they are not hyper-parameters (a checkpoint loads either way). The hyper-parameters are
    stored as plain data (``optim`` as a dict), so ``FlowMatchingModule.load_from_checkpoint(path)``
    rebuilds the network with torch's ``weights_only`` loading; ``**flat`` accepts the optimizer keys of
    checkpoints written before ``optim`` was one argument (``optim_config``).
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any] | None = None,
        seed: int = 0,
        dataset: str | None = None,
        compile: bool | str | None = None,
        compile_mode: str = "default",
        **flat: Any,
    ):
        super().__init__()
        use_compile(compile, compile_mode, "cpu")  # a bad value fails here, before any training
        self.compile_setting, self.compile_mode = compile, compile_mode
        self._step_times: list[float] | None = None
        self.optim = optim_config(optim, flat)
        hparams = {"model": dict(model), "optim": asdict(self.optim), "seed": seed, "dataset": dataset}
        self.save_hyperparameters(hparams)
        self.config = DiTConfig.from_dict(dict(model))
        self.model = DiT(self.config)
        self.ema = EMA(self.model, self.optim.ema_decay, self.optim.ema_warmup)
        self.objective = FlowMatching(self.optim.t_mean, self.optim.t_std)

    def on_fit_start(self) -> None:
        """Compile the network (and its EMA copy, for validation and sampling) if ``compile`` says so here."""
        if not use_compile(self.compile_setting, self.compile_mode, self.device.type):
            return
        for model in (self.model, self.ema.model):
            model.compile_core(mode=self.compile_mode)
        self._step_times = []
        log.info("torch.compile on (mode %s): the first step compiles the network", self.compile_mode)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._step_times is not None:
            self._sync()
            self._step_start = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """With compile on: ``train/compile_s``, once, = first step − median of the next ``WARM_STEPS``
        (the compile and whatever else the first step pays once; validation's graph compiles later)."""
        if self._step_times is None:
            return
        self._sync()
        self._step_times.append(time.perf_counter() - self._step_start)
        if len(self._step_times) == WARM_STEPS + 1:
            first, *steady = self._step_times
            step_s = statistics.median(steady)
            self.log("train/compile_s", first - step_s, rank_zero_only=True)
            log.info(
                "compile: first step %.1f s, then %.3f s per step: %.1f s to compile", first, step_s, first - step_s
            )
            self._step_times = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

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
                "The last checkpoint on disk is the last good one: lower optim.lr, raise optim.warmup_steps "
                "or set optim.grad_clip, then resume from it."
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

    def configure_optimizers(self) -> dict[str, Any]:
        return self.optim.make_optimizer(self.model.parameters())
