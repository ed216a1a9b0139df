"""When blocks freeze: FreezeOut's freeze times and learning-rate factor, the linear ramp, and
AutoFreeze's gradient-norm criterion, as pure functions.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from lit_efficient.core.time import progress

Warp = Literal["linear", "squared", "cubic"]


WARPS = {"linear": 1, "squared": 2, "cubic": 3}


# -- schedules ------------------------------------------------------------------------------------
def freezeout_times(num_blocks: int, t0: float, warp: str) -> list[float]:
    """Fraction of the run at which each block freezes: ``warp(t0 + (1 − t0)·i/L)``."""
    power = WARPS[warp]
    return [(t0 + (1.0 - t0) * i / num_blocks) ** power for i in range(num_blocks)]


def freezeout_lr_factor(step: float, freeze_step: float) -> float:
    """FreezeOut's per-block learning-rate factor: cosine from 1 at step 0 to 0 at ``freeze_step``."""
    if freeze_step <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / freeze_step)))


def linear_frozen_count(fraction_of_run: float, num_blocks: int, freeze_start: float, freeze_level: float) -> int:
    """Blocks frozen by the linear ramp: ``freeze_level`` of them at the end, none before ``freeze_start``."""
    if fraction_of_run < freeze_start:
        return 0
    level = freeze_level * progress(fraction_of_run, freeze_start, 1.0)
    return int(level * num_blocks + 1e-9)


def adaptive_frozen_prefix(changes: list[float], percentile: float) -> int:
    """How many leading active blocks to freeze: those whose gradient-norm change is below the
    ``percentile`` of all active blocks' changes."""
    if not changes:
        return 0
    with np.errstate(invalid="ignore"):
        threshold = float(np.percentile(np.asarray(changes, dtype=np.float64), percentile))
    if math.isnan(threshold):  # a NaN change (or inf - inf): it compares False with everything and would
        return 0  # freeze every block at once
    count = 0
    for change in changes:
        if change >= threshold:
            break
        count += 1
    return count
