"""Helpers shared by every example: the warm-up + cosine learning-rate schedule and the
per-sample loss output of ``training_step``."""

from __future__ import annotations

import math
from typing import Any

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to
    ``min_lr_ratio`` times the base rate. Meant to be stepped once per optimizer step."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
    total = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1) so the very first step already moves the weights
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_training_steps(trainer: Any) -> int:
    """``trainer.estimated_stepping_batches``, refusing an unbounded run (the cosine needs an end)."""
    steps = trainer.estimated_stepping_batches
    if steps is None or not math.isfinite(steps):
        raise ValueError("The cosine schedule needs a finite run: set `max_steps` or `max_epochs`.")
    return int(steps)


def training_output(module: Any, losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """Log ``train/loss`` (and ``train/lr`` when attached to a Trainer, so the schedule shows in
    TensorBoard without a LearningRateMonitor) and return the per-sample loss contract's dict."""
    loss = losses.mean()
    module.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=losses.numel())
    if module._trainer is not None:
        module.log("train/lr", module.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
    return {"loss": loss, "sample_losses": losses}
