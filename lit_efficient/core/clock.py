"""The run clock: where an optimizer step lies in the run, in full-data optimizer steps.

Every schedule of every technique reads this one clock, so that a data-pruning callback's shorter
epochs do not stretch the others' schedules (see :mod:`lit_efficient.core.composition`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lit_efficient.core.protocols import ShortensEpochs

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


def run_position(trainer: "pl.Trainer", step: int) -> int:
    """Where optimizer step ``step`` lies in the run, counted in full-data optimizer steps.

    Fractions and epochs of the run resolve to full-data steps (:class:`TrainingLength`). A
    data-pruning callback (InfoBatch) makes epochs shorter, so ``global_step`` never gets there; it
    reports the steps its pruning has skipped by ``step`` (``skipped_steps(step)``), and every
    schedule reads its position here: on the same clock as the LR schedule InfoBatch advances, so
    ``stop=0.75`` still means three quarters of the epochs. Without such a callback this is ``step``.
    """
    return step + sum(c.skipped_steps(step) for c in trainer.callbacks if isinstance(c, ShortensEpochs))


class StepWatch:
    """Tells, from ``on_train_batch_end``, whether an optimizer step ran since it last said so: with
    gradient accumulation most micro-batches end without one. Every callback asks it this one way
    (``trainer.global_step`` moved), so all agree on fp16 steps a GradScaler skipped too (Lightning
    counts those as steps). ``last`` is the step it last saw: callbacks keep it in their state."""

    def __init__(self, last: int = -1) -> None:
        self.last = last

    def stepped(self, trainer: "pl.Trainer") -> bool:
        if trainer.global_step == self.last:
            return False
        self.last = trainer.global_step
        return True
