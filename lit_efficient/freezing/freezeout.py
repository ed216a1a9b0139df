"""FreezeOut: freeze each block at a fixed fraction of the run, front to back.

Paper: Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing Layers", 2017,
https://arxiv.org/abs/1706.04983 (reference code: github.com/ajbrock/FreezeOut).
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lit_efficient.core.checks import check_bool, check_fraction
from lit_efficient.freezing.base import BlockFreezing, TiedEmbeddings
from lit_efficient.freezing.schedules import WARPS, Warp, freezeout_lr_factor, freezeout_times


def check_t0(t0: float) -> float:
    """``t0``, when FreezeOut's first block freezes before warping, if it lies in (0, 1]."""
    return check_fraction(t0, "t0", high_open=False, low_open=True)


def check_warp(warp: str) -> str:
    if warp not in WARPS:
        raise ValueError(f"`warp` must be one of {list(WARPS)}; got {warp!r}")
    return warp


class FreezeOut(BlockFreezing):
    """Freeze a model front to back: block ``i`` of ``L`` freezes at ``warp(t0 + (1 − t0)·i/L)`` of
    the run (Brock et al. 2017, `arXiv 1706.04983 <https://arxiv.org/abs/1706.04983>`_), and from
    then on its backward is skipped whole (see :mod:`lit_efficient.freezing.base`).

    The defaults freeze the first block at 51% of the run and the last at 89%. Needs a known run
    length (``max_steps`` or ``max_epochs``).

    Args:
        t0: when the first block freezes, as a fraction of the run before warping, in ``(0, 1]``.
            Default ``0.8``.
        warp: how the freeze times are warped: ``"linear"``, ``"squared"`` or ``"cubic"``.
            Default ``"cubic"``.
        lr_annealing: scale each block's updates by ``½(1 + cos(π t / t_i))``, reaching zero at its
            freeze time ``t_i``, on top of the module's own LR schedule. Works with any optimizer
            whose update is proportional to the learning rate (SGD, Adam, AdamW including weight
            decay): the step is taken, then shrunk towards the old weights. Default ``False``.
        blocks: the blocks in forward order as module-name globs or parameter names. Default
            ``None``: discovered (see :class:`~lit_efficient.freezing.base.BlockFreezing`).
        frozen_eval: put frozen blocks in eval mode (BatchNorm statistics and dropout stop).
            Default ``True``.
        tied_embeddings: ``"train"`` or ``"freeze"`` a frozen embedding tied to a trainable output
            head (GPT-2). Default ``"train"``.
        cache_frozen_mb: MiB (``>= 0``) for serving the frozen blocks' outputs instead of running
            them again, for inputs that repeat every epoch. Default ``0.0``: off.
        progress_bar: show ``frozen/<blocks>=<n>`` in the progress bar (default True).

    Example::

        trainer = pl.Trainer(max_epochs=20, callbacks=[FreezeOut(t0=0.8, warp="cubic")])
    """

    def __init__(
        self,
        t0: float = 0.8,
        warp: Warp = "cubic",
        lr_annealing: bool = False,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        cache_frozen_mb: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        self.t0 = check_t0(t0)
        self.warp = check_warp(warp)
        self.lr_annealing = check_bool(lr_annealing, "lr_annealing")
        super().__init__(blocks=blocks, frozen_eval=frozen_eval, tied_embeddings=tied_embeddings,
                         cache_frozen_mb=cache_frozen_mb, progress_bar=progress_bar)
        self._annealing: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    @override
    def frozen_at(self, step: int) -> int:
        fraction = self.run_fraction(step)
        return sum(1 for t in freezeout_times(len(self.blocks), self.t0, self.warp) if fraction >= t)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        if self.lr_annealing:
            # right after each optimizer step, before any callback's on_train_batch_end (a sparse
            # callback's pruning must not be blended back in): the result is independent of their order
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(lambda *_: self._anneal_last_step()))

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        if self.lr_annealing:
            self._snapshot_for_annealing(trainer.global_step)

    def _snapshot_for_annealing(self, step: int) -> None:
        total = self._length.total_steps if self._length else None
        if not total:
            return
        times = freezeout_times(len(self.blocks), self.t0, self.warp)
        self._annealing = []
        for block, t in list(zip(self.blocks, times))[self.frozen :]:
            factor = freezeout_lr_factor(self.position(step), t * total)
            if factor < 1.0:
                self._annealing.extend((p, p.detach().clone(), factor) for _, p in block.params
                                       if p.requires_grad and id(p) not in self._tied)

    @torch.no_grad()
    def _anneal_last_step(self) -> None:
        """Shrink the step just taken: ``old + factor·(new − old)`` is the step at ``factor``·lr."""
        for param, old, factor in self._annealing:
            param.sub_(old).mul_(factor).add_(old)
        self._annealing = []
