"""What every benchmark script shares: a step-timing callback and the mean ± std table cell."""

from __future__ import annotations

import statistics
import time
from typing import Optional

import lightning.pytorch as pl


class Measure(pl.Callback):
    """Wall time of every training step (batch start to the end of every callback's batch end, so
    put it last) and the validation loss (with the optimizer step it came at) after every validation run."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.val_losses: list[float] = []
        self.val_steps: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._start)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
            self.val_steps.append(trainer.global_step)


def mean_std(values: list[Optional[float]], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of the values that are not None (one value alone, ``-`` for none)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
