"""Time specs and ramps shared by every technique.

A *time spec* says when something happens, in one of three units:

* a fraction of the run: ``0.5`` or ``"0.5dur"`` (must lie in [0, 1]);
* optimizer steps: ``"500st"`` (an int >= 0), or ``"500ba"`` (Composer's word for the same);
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

from lit_efficient.core.protocols import ShortensEpochs

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as pl


TimeSpec = Union[int, float, str]


TimeUnit = Literal["dur", "st", "ep"]


RampKind = Literal["linear", "cubic", "cosine"]


RAMP_KINDS: tuple[str, ...] = ("linear", "cubic", "cosine")


_SPEC_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(dur|st|ba|ep)\s*$")


_FORMS = "a fraction of the run in [0, 1] (0.5 or '0.5dur'), optimizer steps ('500st' or '500ba') or epochs ('2ep')"


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
            unit = "st" if unit == "ba" else unit  # Composer's batches are our optimizer steps
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
        total_steps = None if total is None or not math.isfinite(total) or total < 0 else int(total)  # -1: endless
        per_epoch: Optional[int] = None
        batches = trainer.num_training_batches
        if batches is not None and math.isfinite(batches) and batches > 0:
            per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        full = [c.full_epoch_steps(trainer) for c in trainer.callbacks if isinstance(c, ShortensEpochs)]
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


def step_interval(spec: TimeSpec, argument: str) -> int:
    """An interval of real optimizer steps (``update_proj_gap``, ``gradient_mask_every``): an int >= 1
    or a time spec in steps (``"200st"``, ``"200ba"``). A fraction of the run or epochs is refused,
    naming ``argument``: such intervals count the optimizer's own steps, whatever the run's length."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str, Time)):
        raise ValueError(f"`{argument}` must be an int >= 1 or optimizer steps ('200st'); got {spec!r}")
    if isinstance(spec, int):
        steps = spec
    else:
        parsed = Time.parse(spec, argument)
        if parsed.unit != "st":
            what = "a fraction of the run" if parsed.unit == "dur" else "in epochs"
            raise ValueError(f"`{argument}`={spec!r} is {what}; it is an interval of optimizer steps: give an int "
                             "or a step count such as '200st'")
        steps = int(parsed.value)
    if steps < 1:
        raise ValueError(f"`{argument}` must be an int >= 1 or optimizer steps ('200st'); got {spec!r}")
    return steps
