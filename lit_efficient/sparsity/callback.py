"""The periodic dynamic-sparse schedule of GraNet, RigL and SET, on the masked-training base.

What every masked-training callback shares (targets and mask buffers at ``setup``, applying the
masks after each optimizer step, dense gradients, deferred updates on overflow steps, FLOPs
accounting, savings, state) is :class:`lit_efficient.sparsity.masked.MaskedTraining`. This module
adds when and from what the masks change: random initial masks with an ERK or uniform layer
``distribution``, and an update every ``update_every`` (a time spec resolved at ``on_train_start``,
with the subclass's own time specs in :meth:`SparseTrainingCallback.resolve_schedule`).
"""

from __future__ import annotations

from typing import Literal, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lit_efficient.core.time import Time, TimeSpec, TrainingLength, is_due
from lit_efficient.sparsity.masked import MaskedTraining
from lit_efficient.sparsity.masks import erk_densities, keep_counts, random_mask, uniform_densities

Distribution = Literal["erk", "uniform"]


class SparseTrainingCallback(MaskedTraining):
    """Base of the periodic dynamic-sparse callbacks (see the module docstring).

    Args:
        sparsity: final fraction of targeted weights that are zero, in [0, 1).
        update_every: time between mask updates (a time spec; default ``"100st"``).
        distribution: per-layer densities, ``"erk"`` (default) or ``"uniform"``.
        include: module-name patterns to sparsify (default: every linear/conv layer except the
            stem and the head; see :mod:`lit_efficient.core.targets`).
        exclude: module-name patterns never to sparsify.
        seed: seed of every random choice (identical on all ranks).
        progress_bar: show ``sparsity=<fraction>`` in the progress bar (default True).
    """

    def __init__(
        self,
        sparsity: float,
        update_every: TimeSpec = "100st",
        distribution: Distribution = "erk",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(sparsity, include, exclude, seed, progress_bar)
        self.update_every = Time.parse(update_every, "update_every")
        if self.update_every.value == 0:
            raise ValueError("`update_every` must be positive")
        if distribution not in ("erk", "uniform"):
            raise ValueError(f"`distribution` must be 'erk' or 'uniform'; got {distribution!r}")
        self.distribution = distribution
        self._every = 1

    # -- the schedule -------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        length = TrainingLength.from_trainer(trainer)
        self._every = max(1, self.update_every.to_steps(length, "update_every"))
        self.resolve_schedule(length)

    def resolve_schedule(self, length: TrainingLength) -> None:
        """Resolve the subclass's time specs to steps (override)."""

    @override
    def initial_masks(self) -> list[torch.Tensor]:
        """Random masks at :meth:`initial_density` with the configured layer distribution."""
        assert self.masks is not None
        density = self.initial_density()
        shapes = self.masks.shapes
        densities = erk_densities(shapes, density) if self.distribution == "erk" else uniform_densities(shapes, density)
        counts = keep_counts(shapes, densities, total_density=density)
        # drawn for the whole layer on every rank alike; a sharded rank keeps its rows
        return [span.take(random_mask(s, k, self.generator)) for s, k, span in zip(shapes, counts, self.masks.spans)]

    @override
    def target_densities(self) -> Optional[tuple[str, list[float]]]:
        """The layer densities of ``distribution`` at the final sparsity."""
        assert self.masks is not None
        shapes, density = self.masks.shapes, 1.0 - self.sparsity
        densities = erk_densities(shapes, density) if self.distribution == "erk" else uniform_densities(shapes, density)
        counts = keep_counts(shapes, densities, total_density=density)
        return f"{self.distribution.upper() if self.distribution == 'erk' else 'uniform'} target", [
            k / size for k, size in zip(counts, self.masks.sizes())]

    def initial_density(self) -> float:
        return 1.0 - self.sparsity

    @override
    def is_update_step(self, step: int) -> bool:
        """Whether the masks change after optimizer step ``step`` (override to bound it)."""
        return is_due(step, self._every, start=self._every)

    def growth_scores(self, grad_scores: Optional[list[torch.Tensor]], growth: str) -> list[torch.Tensor]:
        """Scores for regrowth: |dense gradient|, |momentum of the dense gradients| or uniform random."""
        assert self.masks is not None
        params, spans = self.masks.params, self.masks.spans
        if growth == "random":
            return [span.take(torch.rand(p.shape, generator=self.generator)).to(w.device)
                    for p, w, span in zip(params, self.masks.weights, spans)]
        if growth == "momentum":  # the dense gradients' momentum, kept by the masks at every step
            return [momentum.abs() for momentum in self.masks.gradient_momentum]
        if grad_scores is None:
            return [torch.zeros_like(w, dtype=torch.float32) for w in self.masks.weights]
        return grad_scores


__all__ = ["SparseTrainingCallback"]
