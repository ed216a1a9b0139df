"""The named hooks between techniques.

A technique never imports another. Where one must act on what another built, the second
implements a Protocol named here and the first calls it at one place, found through
``isinstance`` (the Protocols are runtime-checkable):

* :class:`RestartableState` — implemented by ``GaLoreAdamW``; called by ``SparseMasks.set_masks``
  when weights regrow.
* :class:`ShortensEpochs` — implemented by ``InfoBatch``; called by
  :func:`lit_efficient.core.clock.run_position` and ``TrainingLength.from_trainer`` (the run clock).
* :class:`PerParameterOptions` — implemented by ``GaLoreAdamW``; called by the freezer's
  ``remove_from_optimizer`` when parameters leave the optimizer.
* :class:`ReadsPartOfGradients` — implemented by ``GaLoreAdamW``, the masked-training callbacks
  (GraNet, RigL, SET, SparCL) and ``AutoFreeze``; called by
  ``ExactCompressionDDPStrategy`` before each backward, to send only what the step reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

    from lit_efficient.core.gradient_travel import Part


@runtime_checkable
class RestartableState(Protocol):
    """An optimizer whose state of a parameter cannot be zeroed entry by entry (GaLore's moments live
    in a projected space): when weights of ``param`` regrow, it forgets that parameter's state and
    starts it afresh, as at step 0."""

    def restart_state(self, param: torch.Tensor) -> None: ...


@runtime_checkable
class ShortensEpochs(Protocol):
    """A callback that trains on part of the data each epoch (InfoBatch): it reports how the run's
    full-data clock relates to its optimizer steps, so that every other schedule keeps its place."""

    def full_epoch_steps(self, trainer: "pl.Trainer") -> Optional[int]:
        """Optimizer steps of an epoch on all data (None while unknown)."""
        ...

    def skipped_steps(self, step: int) -> int:
        """Optimizer steps its pruning has skipped by optimizer step ``step``."""
        ...


@runtime_checkable
class PerParameterOptions(Protocol):
    """An optimizer whose param groups carry lists aligned with ``group["params"]`` (GaLoreAdamW's
    ``projected`` flags): whoever removes parameters from a group shrinks these lists alongside."""

    per_parameter_options: tuple[str, ...]


@runtime_checkable
class ReadsPartOfGradients(Protocol):
    """A callback or optimizer whose coming optimizer step reads only part of some gradients
    (:mod:`lit_efficient.core.gradient_travel`), or needs some whole where another technique would
    send part (a part of None): data parallelism may then all-reduce only those parts."""

    def gradient_parts(self, trainer: "pl.Trainer") -> list[tuple[str, torch.Tensor, "Part"]]:
        """``(technique, parameter, part)`` for the optimizer step the coming backward computes
        gradients for (``trainer.global_step + 1``); identical on every rank."""
        ...
