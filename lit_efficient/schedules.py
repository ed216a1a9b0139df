"""Time specs and ramps shared by every technique.

A *time spec* says when something happens, in one of three units:

* a fraction of the run: ``0.5`` or ``"0.5dur"`` (must lie in [0, 1]);
* optimizer steps: ``"500st"`` (an int >= 0);
* epochs: ``"2ep"`` (may be fractional: ``"1.5ep"``).

Specs are parsed (and rejected with a message naming the argument) in a callback's ``__init__``
and resolved to optimizer steps at ``on_train_start`` from the Trainer, so every schedule advances
on ``trainer.global_step`` — optimizer steps, never micro-batches — and gradient accumulation is
handled for free.

A *ramp* moves a value from ``initial`` to ``final`` while the step goes from ``start`` to ``end``:
``linear``, ``cubic`` (Zhu & Gupta, arXiv 1710.01878: fast at first, flat at the end) or
``cosine`` (half-cosine). Before ``start`` it is ``initial``, from ``end`` on exactly ``final``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Union

import torch

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl

TimeSpec = Union[int, float, str]
TimeUnit = Literal["dur", "st", "ep"]
RampKind = Literal["linear", "cubic", "cosine"]
RAMP_KINDS: tuple[str, ...] = ("linear", "cubic", "cosine")

_SPEC_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(dur|st|ep)\s*$")
_FORMS = "a fraction of the run in [0, 1] (0.5 or '0.5dur'), optimizer steps ('500st') or epochs ('2ep')"


@dataclass(frozen=True)
class Time:
    """A parsed time spec: ``value`` in ``unit`` (``"dur"``, ``"st"`` or ``"ep"``)."""

    value: float
    unit: TimeUnit

    @classmethod
    def parse(cls, spec: TimeSpec, argument: str = "time") -> "Time":
        """Parse ``spec``; raise ``ValueError`` naming ``argument`` if it is malformed."""
        if isinstance(spec, Time):
            return spec
        if isinstance(spec, bool):
            raise ValueError(f"`{argument}` must be {_FORMS}; got {spec!r}")
        if isinstance(spec, (int, float)):
            value, unit = float(spec), "dur"
            if isinstance(spec, int) and spec > 1:
                raise ValueError(
                    f"`{argument}`={spec!r} is ambiguous: a bare number is a fraction of the run in [0, 1]."
                    f" Write '{spec}st' for optimizer steps or '{spec}ep' for epochs."
                )
        elif isinstance(spec, str):
            match = _SPEC_RE.match(spec)
            if match is None:
                raise ValueError(f"`{argument}` must be {_FORMS}; got {spec!r}")
            value, unit = float(match.group(1)), match.group(2)
        else:
            raise ValueError(f"`{argument}` must be {_FORMS}; got {type(spec).__name__} {spec!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`{argument}` must be non-negative and finite; got {spec!r}")
        if unit == "dur" and value > 1:
            raise ValueError(f"`{argument}`={spec!r}: a fraction of the run must lie in [0, 1]")
        if unit == "st" and value != int(value):
            raise ValueError(f"`{argument}`={spec!r}: optimizer steps must be a whole number")
        return cls(value, unit)  # type: ignore[arg-type]

    def to_steps(self, length: "TrainingLength", argument: str = "time") -> int:
        """Resolve to an optimizer step count against a run of ``length``."""
        if self.unit == "st":
            return int(self.value)
        if self.unit == "dur":
            if length.total_steps is None:
                raise ValueError(
                    f"`{argument}` is a fraction of the run, but the run length is unknown"
                    " (set `max_steps` or `max_epochs` on the Trainer, or give the time in steps: '500st')"
                )
            return int(round(self.value * length.total_steps))
        if length.steps_per_epoch is None:
            raise ValueError(
                f"`{argument}` is given in epochs, but the number of optimizer steps per epoch is unknown"
                " (the training dataloader has no length); give it in steps: '500st'"
            )
        return int(round(self.value * length.steps_per_epoch))

    def __str__(self) -> str:
        value = int(self.value) if self.value == int(self.value) and self.unit != "dur" else self.value
        return f"{value}{self.unit}"


def parse_time(spec: TimeSpec, argument: str = "time") -> Time:
    """Parse a time spec (see the module docstring); errors name ``argument``."""
    return Time.parse(spec, argument)


@dataclass(frozen=True)
class TrainingLength:
    """How long a run is, in optimizer steps: what time specs are resolved against."""

    total_steps: Optional[int]
    steps_per_epoch: Optional[int] = None

    @classmethod
    def from_trainer(cls, trainer: "pl.Trainer") -> "TrainingLength":
        """Read the run length from a Trainer; call from ``on_train_start`` or later.

        ``estimated_stepping_batches`` sets up the training dataloader. Asked before a resume has
        restored the loops (in ``on_fit_start``), it makes Lightning 2.6 drop a stateful loader's
        saved position (Lightning issue #20550), and the run resumes from the epoch's first batch.

        The length is in full-data steps: with a data-pruning callback (InfoBatch, which reports
        ``full_epoch_steps``) the current epoch may be shorter, but the run is measured as if every
        epoch used all data (the clock of :func:`run_position`), whichever epoch a resume starts in.
        A ``max_steps`` that ends the run first counts real steps: with pruned epochs the run then
        ends past that point in full-data time, so fractions of the run fall early by the steps
        the pruning skipped."""
        total = trainer.estimated_stepping_batches  # also sets up the train dataloader
        total_steps = None if total is None or not math.isfinite(total) else int(total)
        per_epoch: Optional[int] = None
        batches = trainer.num_training_batches
        if batches is not None and math.isfinite(batches) and batches > 0:
            per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        full = [c.full_epoch_steps(trainer) for c in trainer.callbacks if callable(getattr(c, "full_epoch_steps", None))]
        full = [steps for steps in full if steps is not None]
        if full and trainer.max_epochs is not None and trainer.max_epochs > 0:
            per_epoch = full[0]
            total_steps = per_epoch * trainer.max_epochs
            if trainer.max_steps is not None and trainer.max_steps >= 0:
                total_steps = min(total_steps, trainer.max_steps)
        return cls(total_steps, per_epoch)

    def steps(self, spec: TimeSpec, argument: str = "time") -> int:
        """Parse and resolve ``spec`` to optimizer steps."""
        return Time.parse(spec, argument).to_steps(self, argument)


def run_position(trainer: "pl.Trainer", step: int) -> int:
    """Where optimizer step ``step`` lies in the run, counted in full-data optimizer steps.

    Fractions and epochs of the run resolve to full-data steps (:class:`TrainingLength`). A
    data-pruning callback (InfoBatch) makes epochs shorter, so ``global_step`` never gets there; it
    reports the steps its pruning has skipped by ``step`` (``skipped_steps(step)``), and every
    schedule reads its position here: on the same clock as the LR schedule InfoBatch advances, so
    ``stop=0.75`` still means three quarters of the epochs. Without such a callback this is ``step``.
    """
    return step + sum(c.skipped_steps(step) for c in trainer.callbacks if callable(getattr(c, "skipped_steps", None)))


def epoch_generator(seed: int, epoch: int, offset: int = 0) -> torch.Generator:
    """A generator seeded by ``seed`` and ``epoch`` alone: the same draws for that epoch on every
    rank and after any resume (``offset`` separates independent draws of one epoch)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch + offset)


def host_int(value: torch.Tensor) -> int:
    """``int(value)`` of a one-element tensor that lives on the host, such as a CPU generator's draw:
    no device to wait for (the sync-counting test exempts this helper, and only this one)."""
    if value.device.type != "cpu":
        raise ValueError(f"host_int reads host tensors only; this one is on {value.device}")
    return int(value)


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in page-locked host memory when a CUDA device exists: a copy of it (or of a slice
    of it) to the device with ``non_blocking=True`` then does not wait for the stream, as a copy
    from ordinary (pageable) memory does."""
    return tensor.pin_memory() if torch.cuda.is_available() and not tensor.is_pinned() else tensor


def check_fraction(value: float, argument: str, low: float = 0.0, high: float = 1.0, high_open: bool = True,
                   low_open: bool = False) -> float:
    """``value`` as a float if it lies in the interval (closed unless ``*_open``); else a ValueError naming ``argument``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    above = number and (low < value if low_open else low <= value)
    below = number and (value < high if high_open else value <= high)
    if not (above and below):
        raise ValueError(f"`{argument}` must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}; "
                         f"got {value!r}")
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


def check_ramp_kind(kind: str, argument: str = "schedule") -> str:
    if kind not in RAMP_KINDS:
        raise ValueError(f"`{argument}` must be one of {list(RAMP_KINDS)}; got {kind!r}")
    return kind


def progress(step: float, start: float, end: float) -> float:
    """Fraction of the way from ``start`` to ``end`` at ``step``, clamped to [0, 1]."""
    if end <= start:
        return 0.0 if step < start else 1.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def interpolate(kind: RampKind, fraction: float, initial: float, final: float) -> float:
    """Value of a ramp of ``kind`` at ``fraction`` (0 → ``initial``, 1 → exactly ``final``)."""
    if fraction <= 0.0:
        return initial
    if fraction >= 1.0:
        return final
    if kind == "linear":
        remaining = 1.0 - fraction
    elif kind == "cubic":
        remaining = (1.0 - fraction) ** 3
    elif kind == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * fraction))
    else:
        raise ValueError(f"unknown ramp {kind!r}; expected one of {list(RAMP_KINDS)}")
    return final + (initial - final) * remaining


def ramp(kind: RampKind, step: float, start: float, end: float, initial: float, final: float) -> float:
    """Value at ``step`` of a ramp from ``initial`` (until ``start``) to ``final`` (from ``end``)."""
    return interpolate(kind, progress(step, start, end), initial, final)


def is_due(step: int, every: int, start: int = 0, end: Optional[int] = None) -> bool:
    """Whether a periodic event falls on ``step``: every ``every`` steps counted from ``start``,
    up to and including ``end``."""
    if every <= 0 or step < start or (end is not None and step > end):
        return False
    return (step - start) % every == 0


__all__ = [
    "RAMP_KINDS",
    "Time",
    "TimeSpec",
    "TrainingLength",
    "check_fraction",
    "check_ramp_kind",
    "interpolate",
    "is_due",
    "parse_time",
    "progress",
    "ramp",
]
