"""Argument checks: every constructor validates its arguments with these, and the message names
the argument and the allowed range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    pass


def check_fraction(value: float, argument: str, low: float = 0.0, high: float = 1.0, high_open: bool = True,
                   low_open: bool = False) -> float:
    """``value`` as a float if it lies in the interval (closed unless ``*_open``); else a ValueError
    naming ``argument``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    above = number and (low < value if low_open else low <= value)
    below = number and (value < high if high_open else value <= high)
    if not (above and below):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"`{argument}` must lie in {left}{low}, {high}{right}; got {value!r}")
    return float(value)


def check_int(value: int, argument: str, minimum: Optional[int] = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``; else a ValueError naming ``argument``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"`{argument}` must be an int{bound}; got {value!r}")
    return value


def check_bool(value: bool, argument: str) -> bool:
    """``value`` if it is True or False (not 1, "yes" ...); else a ValueError naming ``argument``."""
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be True or False; got {value!r}")
    return value
