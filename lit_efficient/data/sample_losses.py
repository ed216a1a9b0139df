"""The per-sample loss contract, and the one reduction every loss-reading callback shares.

A module opts in by returning one loss per sample from ``training_step``::

    return {"loss": losses.mean(), "sample_losses": losses}

Lightning accepts this dict unchanged, so the module trains without our callbacks too. A loss with
terms that belong to no sample of the batch (a regulariser, DER++'s replay of stored samples)
declares them: ``{"loss": losses.mean() + extra, "sample_losses": losses, "extra_loss": extra}``;
the callbacks weight ``sample_losses`` and add ``extra_loss`` back unchanged. When a
:class:`SampleLossCallback` (LossReweighting, InfoBatch, SparCL's data removal) is attached, the
module's ``training_step`` is wrapped at ``setup`` (and unwrapped at ``teardown``) so that
``"loss"`` is replaced by

    ``loss = Σ_i m_i · ℓ_i / N_local``,  with ``m_i = Π_callbacks m_i^(c)``,

where each callback supplies per-sample multipliers ``m^(c)`` (1 everywhere is the plain mean)
computed without gradient. Several callbacks compose by multiplying their multipliers. Samples
whose loss is not finite get multiplier 0 and do not poison the loss (a warning says how many);
when every callback leaves the batch alone the result is exactly ``sample_losses.mean()``.

Gradient accumulation needs nothing special: each micro-batch is reduced on its own and
Lightning divides by ``accumulate_grad_batches`` as usual. Under DDP the multipliers are
computed from all-gathered losses (:func:`gather_samples`), so every rank agrees on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.distributed import refuse_sharded_strategies
from lit_efficient.core.lightning_internals import replace_method, restore_method

CONTRACT = ('`training_step` must return {"loss": losses.mean(), "sample_losses": losses}, with `losses` a 1-D '
            "tensor of one loss per sample (for a language model: each sequence's mean token loss)")


_REDUCERS = "_lit_efficient_sample_loss_callbacks"


_ORIGINAL = "_lit_efficient_original_training_step"


class SampleLossCallback(EfficientCallback):
    """Base of callbacks that reduce the per-sample losses of the batch themselves.

    Subclasses override :meth:`sample_multipliers`; the base wraps ``training_step`` while fit
    runs and records, per micro-batch, the statistics :meth:`reduced` receives.
    """

    def sample_multipliers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", losses: Tensor,
                           finite: Tensor, output: Mapping[str, Any]) -> Optional[Tensor]:
        """Per-sample multipliers for this micro-batch, or None to leave it alone.

        Args:
            losses: the local ``sample_losses``, detached, non-finite entries replaced by 0.
            finite: which entries of ``sample_losses`` were finite.
            output: everything ``training_step`` returned (e.g. ``"timesteps"`` of a diffusion model).
        """
        return None

    def reduced(self, trainer: "pl.Trainer", losses: Tensor, finite: Tensor, multipliers: Tensor) -> None:
        """Called after the reduction with the final multipliers (override to keep statistics)."""

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            # nothing here touches weights: the losses are gathered over the ranks that hold different data
            refuse_sharded_strategies(trainer, type(self).__name__, "it has not been tested there", fsdp2=True)
            attach(trainer, pl_module, self)
        super().setup(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            detach(pl_module, self)


def attach(trainer: "pl.Trainer", pl_module: "pl.LightningModule", callback: SampleLossCallback) -> None:
    """Route ``pl_module.training_step``'s output through the shared reduction (idempotent)."""
    callbacks = pl_module.__dict__.get(_REDUCERS)
    if callbacks is None:
        original = pl_module.training_step
        callbacks = []

        def training_step(*args: Any, **kwargs: Any) -> Any:
            return reduce_sample_losses(trainer, pl_module, original(*args, **kwargs), callbacks)

        pl_module.__dict__[_REDUCERS] = callbacks
        pl_module.__dict__[_ORIGINAL] = replace_method(pl_module, "training_step", training_step)
    if callback not in callbacks:
        callbacks.append(callback)
    # the order of the trainer's callbacks, whatever order setup ran in
    order = {id(c): i for i, c in enumerate(trainer.callbacks)}
    callbacks.sort(key=lambda c: order.get(id(c), len(order)))


def detach(pl_module: "pl.LightningModule", callback: SampleLossCallback) -> None:
    """Undo :func:`attach` for ``callback``; the last one out restores the module's own method."""
    callbacks = pl_module.__dict__.get(_REDUCERS)
    if callbacks is None:
        return
    if callback in callbacks:
        callbacks.remove(callback)
    if not callbacks:
        del pl_module.__dict__[_REDUCERS]
        restore_method(pl_module, "training_step", pl_module.__dict__.pop(_ORIGINAL))


def check_contract(output: Any, names: str) -> Tensor:
    """``output["sample_losses"]`` if ``output`` follows the contract; else a clear error."""
    if not isinstance(output, Mapping) or "sample_losses" not in output:
        got = f"a dict with keys {sorted(output)}" if isinstance(output, Mapping) else f"a {type(output).__name__}"
        raise ValueError(f"{names} need per-sample losses: {CONTRACT}. It returned {got}.")
    losses = output["sample_losses"]
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{names} need per-sample losses: {CONTRACT}. `sample_losses` was {shape}.")
    return losses


def reduce_sample_losses(trainer: "pl.Trainer", pl_module: "pl.LightningModule", output: Any,
                         callbacks: list[SampleLossCallback]) -> Any:
    """Replace ``output["loss"]`` by the callbacks' weighted reduction (see the module docstring)."""
    if output is None or not callbacks:  # a skipped batch stays skipped
        return output
    losses = check_contract(output, " and ".join(type(c).__name__ for c in callbacks))
    detached = losses.detach()
    finite = torch.isfinite(detached)
    clean = torch.where(finite, detached, torch.zeros_like(detached))
    multipliers: Optional[Tensor] = None
    for callback in callbacks:
        m = callback.sample_multipliers(trainer, pl_module, clean, finite, output)
        if m is not None:
            m = m.detach().to(device=losses.device, dtype=torch.float32)
            multipliers = m if multipliers is None else multipliers * m
    kept = torch.where(finite, losses, torch.zeros_like(losses))  # no NaN reaches the loss
    if multipliers is None:  # exactly the plain mean when all is finite, without a host sync
        count = finite.sum().clamp(min=1)
        loss = torch.where(finite.all(), losses.mean(), kept.sum() / count)
        multipliers = finite.to(torch.float32)
    else:
        multipliers = torch.where(finite, multipliers, torch.zeros_like(multipliers))
        loss = (multipliers.to(losses.dtype) * kept).sum() / losses.numel()
    for callback in callbacks:
        callback.reduced(trainer, clean, finite, multipliers)
    extra = output.get("extra_loss")
    if extra is not None:  # terms that are not per-sample (e.g. DER++ replay) pass through unweighted
        loss = loss + extra
    return {**output, "loss": loss}


class NonfiniteCount:
    """Non-finite sample losses counted on their device, read and reported only on :meth:`flush`
    (reading them every step would be a host sync per step)."""

    def __init__(self, technique: str) -> None:
        self.technique = technique
        self.count: Optional[Tensor] = None

    def add(self, finite: Tensor) -> None:
        nonfinite = (~finite).sum()
        self.count = nonfinite if self.count is None else self.count + nonfinite

    def flush(self) -> None:
        """Warn about what was counted since the last flush (nothing if all was finite)."""
        if self.count is not None:
            count, self.count = int(self.count), None
            if count:
                rank_zero_warn(f"{self.technique}: {count} sample loss(es) were NaN/inf and were left out of the "
                               "weighted loss (multiplier 0). Check the model's numerics (fp16 overflow, log of 0) "
                               "if this persists.")
