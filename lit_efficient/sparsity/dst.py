"""Dynamic sparse training at constant density: RigL and SET.

* RigL — Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020,
  https://arxiv.org/abs/1911.11134 (reference code: github.com/google-research/rigl).
* SET — Mocanu et al., "Scalable Training of Artificial Neural Networks with Adaptive Sparse
  Connectivity inspired by Network Science", Nature Communications 2018,
  https://arxiv.org/abs/1707.04780.

Both start from random masks at the target density (ERK by default) and, every ``update_every``
steps until ``stop``, drop ``f(t)`` of each layer's active weights by smallest magnitude and grow
as many: where the dense gradient is largest (RigL) or uniformly at random (SET). The drop
fraction decays as ``f(t) = drop_fraction/2 · (1 + cos(π t / stop))`` (RigL), or stays at
``drop_fraction`` with ``drop_schedule="constant"`` (SET's original ζ). Every layer keeps its
number of active weights, so the density never changes.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Optional

import torch
from typing_extensions import override

from lit_efficient.core.checks import check_fraction
from lit_efficient.core.time import Time, TimeSpec, TrainingLength, ramp
from lit_efficient.sparsity.callback import Distribution, SparseTrainingCallback
from lit_efficient.sparsity.masks import drop_and_grow

DropSchedule = Literal["cosine", "constant"]


def rigl_drop_fraction(step: int, stop: int, initial: float) -> float:
    """RigL's cosine-decayed drop fraction ``initial/2 · (1 + cos(π step / stop))``; 0 from ``stop`` on."""
    if step >= stop:
        return 0.0
    return ramp("cosine", step, 0, stop, initial, 0.0)


class DynamicSparseTraining(SparseTrainingCallback):
    """Constant-density drop-and-grow (the shared part of :class:`RigL` and :class:`SET`, which
    differ only in their ``growth`` criterion: ``"gradient"`` or ``"random"``).

    Args:
        sparsity: fraction of targeted weights that are zero, in [0, 1). Default 0.9.
        update_every: time between mask updates (default ``"100st"``, RigL's ΔT).
        drop_fraction: initial fraction α of each layer's active weights replaced per update,
            in [0, 1) (default 0.3).
        stop: when mask updates end (time spec; default 0.75 of the run, RigL's T_end).
        drop_schedule: ``"cosine"`` (default) decays the drop fraction to zero at ``stop``;
            ``"constant"`` keeps it at ``drop_fraction``.
        distribution: layer densities, ``"erk"`` (default) or ``"uniform"``.
        include, exclude: module-name patterns (see :mod:`lit_efficient.core.targets`).
        seed: seed of the random choices (identical on all ranks).
        progress_bar: show ``sparsity=<fraction>`` in the progress bar (default True).
    """

    growth: ClassVar[str] = "gradient"

    def __init__(
        self,
        sparsity: float = 0.9,
        update_every: TimeSpec = "100st",
        drop_fraction: float = 0.3,
        stop: TimeSpec = 0.75,
        drop_schedule: DropSchedule = "cosine",
        distribution: Distribution = "erk",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(sparsity, update_every, distribution, include, exclude, seed, progress_bar)
        self.drop_fraction = check_fraction(drop_fraction, "drop_fraction")
        self.stop = Time.parse(stop, "stop")
        if drop_schedule not in ("cosine", "constant"):
            raise ValueError(f"`drop_schedule` must be 'cosine' or 'constant'; got {drop_schedule!r}")
        self.drop_schedule = drop_schedule
        self._stop = 0

    @override
    def resolve_schedule(self, length: TrainingLength) -> None:
        self._stop = self.stop.to_steps(length, "stop")

    @override
    def is_update_step(self, step: int) -> bool:
        return self.update_window_open(step) and super().is_update_step(step)

    @override
    def update_window_open(self, step: int) -> bool:
        return self.position(step) < self._stop

    @override
    def update(self, step: int, optimizer, grad_scores: Optional[list[torch.Tensor]]) -> dict[str, float]:
        assert self.masks is not None
        masks = self.masks
        if self.drop_schedule == "constant":
            fraction = self.drop_fraction
        else:
            fraction = rigl_drop_fraction(self.position(step), self._stop, self.drop_fraction)
        scores = self.growth_scores(grad_scores, self.growth)
        new_masks = [
            m if frozen else drop_and_grow(w, m, math.ceil(fraction * active), s, span=span, active=active)
            for w, m, s, frozen, span, active in zip(masks.weights, masks.masks, scores, self.frozen_layers(),
                                                     masks.spans, masks.nonzeros())
        ]
        regrown = sum(masks.set_masks(new_masks, optimizer))
        return {"drop_fraction": fraction, "regrown": float(regrown), "density": masks.density()}


class RigL(DynamicSparseTraining):
    """RigL: constant-density sparse training that grows where the dense gradient is largest.

    Arguments as :class:`DynamicSparseTraining`.
    """

    technique = "rigl"
    growth = "gradient"


class SET(DynamicSparseTraining):
    """SET: constant-density sparse training with random regrowth.

    Arguments as :class:`DynamicSparseTraining`. The classic SET recipe updates once per epoch
    with a constant fraction: ``update_every="1ep", drop_schedule="constant", stop=1.0``.
    """

    technique = "set"
    growth = "random"


__all__ = ["DynamicSparseTraining", "RigL", "SET", "rigl_drop_fraction"]
