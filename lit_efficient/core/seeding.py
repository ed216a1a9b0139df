"""Random choices that every rank and every resume makes alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    pass


def epoch_generator(seed: int, epoch: int, offset: int = 0) -> torch.Generator:
    """A generator seeded by ``seed`` and ``epoch`` alone: the same draws for that epoch on every
    rank and after any resume (``offset`` separates independent draws of one epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + offset)
