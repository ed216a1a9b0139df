"""GraNet: gradual magnitude pruning with zero-cost neuroregeneration.

Paper: Liu et al., "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
NeurIPS 2021, https://arxiv.org/abs/2106.10404 (reference code: github.com/VITA-Group/GraNet).

Every ``update_every`` steps: (1) prune globally by magnitude to the cubic schedule's density,
(2) in each layer drop a further ``ceil(r(t)·nnz)`` smallest active weights and regrow as many
where the dense gradient is largest, ``r(t)`` cosine-decaying from ``regrow_fraction`` over the
whole run. Dense-to-sparse with ``initial_density=1.0`` (default) or sparse-to-sparse from random
ERK/uniform masks (the paper's headline uses 0.5).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from typing_extensions import override

from lit_efficient.core.checks import check_fraction
from lit_efficient.core.time import Time, TimeSpec, TrainingLength, ramp
from lit_efficient.sparsity.callback import Distribution, SparseTrainingCallback
from lit_efficient.sparsity.masks import drop_and_grow, global_magnitude_masks

Growth = Literal["gradient", "momentum", "random"]


def granet_density(step: int, start: int, end: int, initial_density: float, final_density: float) -> float:
    """Scheduled density at ``step``: Zhu & Gupta's cubic sparsity ramp from ``start`` to ``end``."""
    return 1.0 - ramp("cubic", step, start, end, 1.0 - initial_density, 1.0 - final_density)


def regrow_fraction_at(step: int, total: int, initial: float, final: float) -> float:
    """Cosine decay of the regrowth fraction over the whole run."""
    return ramp("cosine", step, 0, total, initial, final)


class GraNet(SparseTrainingCallback):
    """Gradual pruning to ``sparsity`` with neuroregeneration (see the module docstring).

    Args:
        sparsity: final fraction of targeted weights that are zero, in [0, 1). Default 0.9.
        initial_density: density at the start, in (0, 1]; 1.0 (default) prunes dense-to-sparse,
            below 1 starts from random masks (sparse-to-sparse; the paper's headline uses 0.5).
        prune_start: when pruning starts (time spec, default 0.0).
        prune_end: when the final sparsity is reached (time spec, default 0.5 of the run).
        update_every: time between mask updates (default ``"100st"``; the paper uses 1000 steps on
            ImageNet — scale it to the run).
        regrow_fraction: initial regrowth fraction r, in [0, 1) (default 0.5), cosine-decayed to
            ``final_regrow_fraction`` (default 0.005) at the end of training.
        growth: regrowth criterion, ``"gradient"`` (default), ``"momentum"`` (the momentum of the
            dense gradients, kept at every step in one fp32 buffer per targeted weight) or ``"random"``.
        distribution: layer densities of the initial random masks, ``"erk"`` (default) or ``"uniform"``.
        include, exclude: module-name patterns (see :mod:`lit_efficient.core.targets`).
        seed: seed of the random choices (identical on all ranks).
        progress_bar: show ``sparsity=<fraction>`` in the progress bar (default True).
    """

    technique = "granet"

    def __init__(
        self,
        sparsity: float = 0.9,
        initial_density: float = 1.0,
        prune_start: TimeSpec = 0.0,
        prune_end: TimeSpec = 0.5,
        update_every: TimeSpec = "100st",
        regrow_fraction: float = 0.5,
        final_regrow_fraction: float = 0.005,
        growth: Growth = "gradient",
        distribution: Distribution = "erk",
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(sparsity, update_every, distribution, include, exclude, seed, progress_bar)
        self.initial_density_value = check_fraction(initial_density, "initial_density", 0.0, 1.0, high_open=False)
        if self.initial_density_value == 0.0:
            raise ValueError("`initial_density` must lie in (0, 1]; got 0.0")
        if self.initial_density_value < 1.0 - self.sparsity:
            raise ValueError(
                f"`initial_density`={initial_density} is below the final density {1 - self.sparsity:.4g}"
                " (1 - `sparsity`): GraNet only prunes"
            )
        self.prune_start = Time.parse(prune_start, "prune_start")
        self.prune_end = Time.parse(prune_end, "prune_end")
        if self.prune_start.unit == self.prune_end.unit and self.prune_end.value < self.prune_start.value:
            raise ValueError(f"`prune_end` ({prune_end}) must not come before `prune_start` ({prune_start})")
        self.regrow_fraction = check_fraction(regrow_fraction, "regrow_fraction")
        self.final_regrow_fraction = check_fraction(final_regrow_fraction, "final_regrow_fraction")
        if growth not in ("gradient", "momentum", "random"):
            raise ValueError(f"`growth` must be 'gradient', 'momentum' or 'random'; got {growth!r}")
        self.growth = growth
        self._start = self._end = self._total = 0

    @override
    def initial_density(self) -> float:
        return self.initial_density_value

    @override
    def initial_masks(self) -> list[torch.Tensor]:
        assert self.masks is not None
        if self.initial_density_value == 1.0:
            return [torch.ones_like(m) for m in self.masks.masks]
        return super().initial_masks()

    @override
    def resolve_schedule(self, length: TrainingLength) -> None:
        self._start = self.prune_start.to_steps(length, "prune_start")
        self._end = self.prune_end.to_steps(length, "prune_end")
        if self._end < self._start:
            raise ValueError(f"`prune_end` ({self.prune_end}, step {self._end}) comes before `prune_start` "
                             f"({self.prune_start}, step {self._start})")
        self._total = length.total_steps or max(self._end, 1)

    def scheduled_density(self, step: int) -> float:
        return granet_density(step, self._start, self._end, self.initial_density_value, 1.0 - self.sparsity)

    @override
    def is_update_step(self, step: int) -> bool:
        # the final sparsity is reached at exactly prune_end, whatever update_every is
        return super().is_update_step(step) or (step > 0 and self.position(step - 1) < self._end <= self.position(step))

    @override
    def update(self, step: int, optimizer, grad_scores: Optional[list[torch.Tensor]]) -> dict[str, float]:
        assert self.masks is not None
        masks = self.masks
        density = self.scheduled_density(self.position(step))
        before = sum(masks.nonzeros())
        keep = int(round(density * sum(masks.sizes())))
        pruned = 0
        frozen = self.frozen_layers()
        # frozen layers keep all their weights: the others are pruned harder to reach the target
        keep = max(keep, sum(n for n, f in zip(masks.nonzeros(), frozen) if f))
        if keep < before:
            masks.set_masks(global_magnitude_masks(masks.weights, masks.masks, keep, fixed=frozen, spans=masks.spans,
                                                   active=masks.nonzeros()), optimizer)
            pruned = before - keep
        fraction = regrow_fraction_at(self.position(step), self._total, self.regrow_fraction,
                                      self.final_regrow_fraction)
        scores = self.growth_scores(grad_scores, self.growth)
        new_masks = [
            m if f else drop_and_grow(w, m, math.ceil(fraction * active), s, span=span, active=active)
            for w, m, s, f, span, active in zip(masks.weights, masks.masks, scores, frozen, masks.spans,
                                                masks.nonzeros())
        ]
        regrown = sum(masks.set_masks(new_masks, optimizer))
        return {
            "scheduled_density": density,
            "density": masks.density(),
            "pruned": float(pruned),
            "regrown": float(regrown),
            "regrow_fraction": fraction,
        }


__all__ = ["GraNet", "granet_density", "regrow_fraction_at"]
