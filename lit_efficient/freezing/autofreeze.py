"""AutoFreeze: freeze the leading blocks whose gradients stopped changing.

Paper: Liu et al., "AutoFreeze: Automatically Freezing Model Blocks to Accelerate Fine-tuning",
2021, https://arxiv.org/abs/2102.01386.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lit_efficient.core.checks import check_fraction
from lit_efficient.core.distributed import squared_sums
from lit_efficient.core.gradient_travel import Part
from lit_efficient.core.time import Time, TimeSpec, TrainingLength, is_due
from lit_efficient.freezing.base import BlockFreezing, TiedEmbeddings
from lit_efficient.freezing.linear import check_freeze_level
from lit_efficient.freezing.schedules import adaptive_frozen_prefix


def check_percentile(percentile: float) -> float:
    """``percentile``, AutoFreeze's threshold, if it lies in (0, 100]."""
    return check_fraction(percentile, "percentile", 0.0, 100.0, high_open=False, low_open=True)


def parse_check_every(check_every: TimeSpec) -> Time:
    every = Time.parse(check_every, "check_every")
    if every.value == 0:
        raise ValueError("`check_every` must be positive")
    return every


class AutoFreeze(BlockFreezing):
    """Freeze a model front to back as its blocks converge (Liu et al. 2021,
    `arXiv 2102.01386 <https://arxiv.org/abs/2102.01386>`_): every ``check_every`` from
    ``freeze_start``, each active block's gradient norm is compared with the last check's, and the
    leading active blocks whose relative change is below the ``percentile`` of all active blocks'
    changes freeze; each frozen block's backward is skipped whole (see
    :mod:`lit_efficient.freezing.base`).

    The norms are read after DDP averaged the gradients (and AMP unscaled them), so every rank
    freezes alike; a check that falls on an fp16 overflow step moves to the next finite one.
    Works without a known run length when both times are given in steps.

    Args:
        freeze_start: when checking begins: a fraction of the run in ``[0, 1]``, or a time spec such
            as ``"200st"`` (steps) or ``"5ep"`` (epochs). Default ``0.5``.
        freeze_level: the largest fraction of blocks ever frozen, in ``(0, 1]``. Default ``1.0``.
        check_every: time between checks, positive (``"50st"``, ``"1ep"``, or a fraction of the run).
            Default ``"50st"``.
        percentile: the threshold, a percentile of the active blocks' gradient-norm changes, in
            ``(0, 100]``. Default ``50.0``.
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

        trainer = pl.Trainer(max_epochs=20, callbacks=[AutoFreeze(freeze_start=0.3, check_every="50st")])
    """

    needs_run_length = False  # it decides from gradients, not from where the run is
    plans_ahead = False  # nor is there a plan to draw: the timeline shows the actual freeze steps only

    def __init__(
        self,
        freeze_start: TimeSpec = 0.5,
        freeze_level: float = 1.0,
        check_every: TimeSpec = "50st",
        percentile: float = 50.0,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        cache_frozen_mb: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        self.freeze_start = Time.parse(freeze_start, "freeze_start")
        self.freeze_level = check_freeze_level(freeze_level)
        self.check_every = parse_check_every(check_every)
        self.percentile = check_percentile(percentile)
        super().__init__(blocks=blocks, frozen_eval=frozen_eval, tied_embeddings=tied_embeddings,
                         cache_frozen_mb=cache_frozen_mb, progress_bar=progress_bar)
        self.previous_norms: list[float] = []  # the active blocks' gradient norms at the last check
        self._pending = 0  # blocks the last check froze, applied after the step
        self._check_deferred = False  # a check fell on an overflow step: check on the next one
        self._start_step = self._every = 0

    @override
    def _resolve_times(self, length: TrainingLength) -> None:
        self._start_step = self.freeze_start.to_steps(length, "freeze_start")
        self._every = max(1, self.check_every.to_steps(length, "check_every"))

    @override
    def frozen_at(self, step: int) -> int:
        return self._pending

    def _checks_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` compares the gradient norms."""
        return self.position(step) >= self._start_step and (self._check_deferred or is_due(step, self._every))

    def gradient_parts(self, trainer: "pl.Trainer") -> list[tuple[str, torch.Tensor, Part]]:
        """On a check step every trainable block's gradients are read whole (their norms), also where
        another technique would send only part of them
        (:class:`lit_efficient.core.protocols.ReadsPartOfGradients`)."""
        if not getattr(self, "blocks", None) or not self._checks_at(trainer.global_step + 1):
            return []
        return [(self.technique, p, None) for block in self.blocks[self.frozen:] for _, p in block.params]

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        step = trainer.global_step + 1
        if not self._checks_at(step):
            return
        # not from an fp16 overflow step: NaN norms once froze every block at once, irreversibly
        self._check_deferred = not self.gradients_finite(optimizer, "the adaptive freezing check", step)
        if self._check_deferred:
            return
        # gradients here are unscaled (AMP) and averaged (DDP), or sharded alike (FSDP2): every rank decides alike
        grads = [[p.grad for _, p in block.params if p.grad is not None] for block in self.blocks[self.frozen:]]
        norms = squared_sums(grads, pl_module.device).sqrt().tolist() if grads else []  # one sync (fp32 roots)
        previous = self.previous_norms[-len(norms):] if len(self.previous_norms) >= len(norms) else []
        self.previous_norms = norms
        if not previous:
            return
        changes = [abs(p - c) / p if p > 0 else float("inf") for p, c in zip(previous, norms)]
        limit = int(self.freeze_level * len(self.blocks) + 1e-9)
        self._pending = min(limit, self.frozen + adaptive_frozen_prefix(changes, self.percentile))

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(previous_norms=list(self.previous_norms), pending=self._pending,
                     check_deferred=self._check_deferred)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.previous_norms = [float(v) for v in state_dict["previous_norms"]]
        self._pending = int(state_dict["pending"])
        self._check_deferred = bool(state_dict.get("check_deferred", False))
