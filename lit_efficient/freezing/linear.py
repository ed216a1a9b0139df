"""Linear freezing: the frozen fraction of blocks grows linearly to the end of the run.

Composer's LayerFreezing schedule, but freezing a true prefix, so the backward through the frozen
blocks goes too (see :mod:`lit_efficient.freezing.base`).
"""

from __future__ import annotations

from typing import Optional

from typing_extensions import override

from lit_efficient.core.checks import check_fraction
from lit_efficient.core.time import Time, TimeSpec, TrainingLength
from lit_efficient.freezing.base import BlockFreezing, TiedEmbeddings
from lit_efficient.freezing.schedules import linear_frozen_count


def check_freeze_level(freeze_level: float) -> float:
    """``freeze_level``, the fraction of blocks frozen at most, if it lies in (0, 1]."""
    return check_fraction(freeze_level, "freeze_level", high_open=False, low_open=True)


class LinearFreezing(BlockFreezing):
    """Freeze a model front to back on a linear ramp: none of its blocks before ``freeze_start``,
    then a fraction growing linearly to ``freeze_level`` of them at the end of the run; each frozen
    block's backward is skipped whole (see :mod:`lit_efficient.freezing.base`).

    Needs a known run length (``max_steps`` or ``max_epochs``).

    Args:
        freeze_start: when the ramp begins: a fraction of the run in ``[0, 1]``, or a time spec such
            as ``"200st"`` (steps) or ``"5ep"`` (epochs). Default ``0.5``.
        freeze_level: the fraction of blocks frozen at the end of the run, in ``(0, 1]``.
            Default ``1.0``.
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

        trainer = pl.Trainer(max_epochs=20, callbacks=[LinearFreezing(freeze_start=0.5, freeze_level=1.0)])
    """

    def __init__(
        self,
        freeze_start: TimeSpec = 0.5,
        freeze_level: float = 1.0,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        cache_frozen_mb: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        self.freeze_start = Time.parse(freeze_start, "freeze_start")
        self.freeze_level = check_freeze_level(freeze_level)
        super().__init__(blocks=blocks, frozen_eval=frozen_eval, tied_embeddings=tied_embeddings,
                         cache_frozen_mb=cache_frozen_mb, progress_bar=progress_bar)
        self._start_step = 0

    @override
    def _resolve_times(self, length: TrainingLength) -> None:
        self._start_step = self.freeze_start.to_steps(length, "freeze_start")

    @override
    def frozen_at(self, step: int) -> int:
        total = self._length.total_steps if self._length else None
        start = self._start_step / total if total else 1.0
        return linear_frozen_count(self.run_fraction(step), len(self.blocks), start, self.freeze_level)
