"""``ProgressiveFreezing``: the three freezing schedules behind one class, for configs.

Each schedule is a named callback with only its own arguments —
:class:`~lit_efficient.freezing.freezeout.FreezeOut`,
:class:`~lit_efficient.freezing.linear.LinearFreezing`,
:class:`~lit_efficient.freezing.autofreeze.AutoFreeze` — and that is what new code should use.
``ProgressiveFreezing(schedule=..., ...)`` stays for existing code and YAML (LightningCLI
``class_path: lit_efficient.ProgressiveFreezing``): it takes every argument of the three, checks
them as it always did, and then *is* the named callback of its schedule (an instance of it), so a
run with it is the named callback's run, bit for bit. Its class is then a subclass of both, still
named ``ProgressiveFreezing``: test it with ``isinstance``, not ``type(c) is``.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Optional

from typing_extensions import override

from lit_efficient.core.checks import check_bool
from lit_efficient.core.targets import validate_patterns
from lit_efficient.core.time import Time, TimeSpec, TrainingLength
from lit_efficient.freezing.autofreeze import AutoFreeze, check_percentile, parse_check_every
from lit_efficient.freezing.base import BlockFreezing, TiedEmbeddings, check_cache_frozen_mb, check_tied_embeddings
from lit_efficient.freezing.freezeout import FreezeOut, check_t0, check_warp
from lit_efficient.freezing.linear import LinearFreezing, check_freeze_level
from lit_efficient.freezing.schedules import Warp

Schedule = Literal["freezeout", "linear", "adaptive"]

SCHEDULES: dict[str, type[BlockFreezing]] = {"freezeout": FreezeOut, "linear": LinearFreezing, "adaptive": AutoFreeze}


class ProgressiveFreezing(BlockFreezing):
    """Freeze a model front-to-back during training, on one of three schedules; the same as the
    named callback of that schedule (see the module docstring).

    Args:
        schedule: ``"freezeout"`` (:class:`~lit_efficient.freezing.freezeout.FreezeOut`, default),
            ``"linear"`` (:class:`~lit_efficient.freezing.linear.LinearFreezing`) or ``"adaptive"``
            (:class:`~lit_efficient.freezing.autofreeze.AutoFreeze`).
        t0: FreezeOut: when the first block freezes, before warping, in (0, 1] (default 0.8).
        warp: FreezeOut: ``"linear"``, ``"squared"`` or ``"cubic"`` (default) warp of the freeze times.
        freeze_start: linear/adaptive: when freezing may begin (time spec; default 0.5).
        freeze_level: linear/adaptive: the largest fraction of blocks frozen, in (0, 1] (default 1.0).
        check_every: adaptive: time between gradient-norm checks (time spec; default ``"50st"``).
        percentile: adaptive: threshold percentile of the active blocks' changes, in (0, 100] (default 50).
        blocks: the blocks in forward order as module-name globs (or parameter names); default:
            discovered (see :class:`~lit_efficient.freezing.base.BlockFreezing`).
        frozen_eval: put frozen blocks in eval mode (BatchNorm statistics and dropout stop; default True).
        tied_embeddings: a frozen embedding tied to a trainable output head (GPT-2): ``"train"``
            (default) keeps the shared matrix training through the head only; ``"freeze"`` freezes
            it, head included.
        lr_annealing: FreezeOut: anneal each block's step size to zero at its freeze time (default False).
        cache_frozen_mb: MiB for serving the frozen blocks' outputs instead of running them again
            (default 0: off).
        progress_bar: show ``frozen/<blocks>=<n>`` in the progress bar (default True).

    Every argument is checked whatever the schedule, as before the named callbacks existed; those
    another schedule reads stay as attributes.
    """

    def __init__(
        self,
        schedule: Schedule = "freezeout",
        t0: float = 0.8,
        warp: Warp = "cubic",
        freeze_start: TimeSpec = 0.5,
        freeze_level: float = 1.0,
        check_every: TimeSpec = "50st",
        percentile: float = 50.0,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        lr_annealing: bool = False,
        cache_frozen_mb: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        # the checks, in the order and with the messages they always had
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be 'freezeout', 'linear' or 'adaptive'; got {schedule!r}")
        check_warp(warp)
        check_tied_embeddings(tied_embeddings)
        self.schedule = schedule
        self.t0, self.warp = check_t0(t0), warp
        self.freeze_start = Time.parse(freeze_start, "freeze_start")
        self.freeze_level = check_freeze_level(freeze_level)
        self.check_every = parse_check_every(check_every)
        self.percentile = check_percentile(percentile)
        validate_patterns(blocks, "blocks")
        check_bool(frozen_eval, "frozen_eval")
        if lr_annealing and schedule != "freezeout":
            raise ValueError("`lr_annealing` anneals each block to its FreezeOut freeze time: use schedule='freezeout'")
        self.lr_annealing = check_bool(lr_annealing, "lr_annealing")
        check_cache_frozen_mb(cache_frozen_mb, frozen_eval)
        check_bool(progress_bar, "progress_bar")

        # from here on this is the named callback of the schedule: its __init__ and hooks run
        self.__class__ = _behaving_as(getattr(type(self), "_umbrella", type(self)), SCHEDULES[schedule])
        common = dict(blocks=blocks, frozen_eval=frozen_eval, tied_embeddings=tied_embeddings,
                      cache_frozen_mb=cache_frozen_mb, progress_bar=progress_bar)
        if schedule == "freezeout":
            super().__init__(t0=t0, warp=warp, lr_annealing=lr_annealing, **common)
        elif schedule == "linear":
            super().__init__(freeze_start=freeze_start, freeze_level=freeze_level, **common)
        else:
            super().__init__(freeze_start=freeze_start, freeze_level=freeze_level, check_every=check_every,
                             percentile=percentile, **common)

    @override
    def _resolve_times(self, length: TrainingLength) -> None:
        # as before: both times are resolved whatever the schedule (a bad one fails for any), and
        # before the run-length check; the named callback then resolves what it reads
        self._start_step = self.freeze_start.to_steps(length, "freeze_start")
        self._every = max(1, self.check_every.to_steps(length, "check_every"))
        super()._resolve_times(length)

    @override
    def _schedule_name(self) -> str:
        return f"schedule={self.schedule!r}"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the per-schedule class is made at run time and cannot be found by name: pickle (DDP spawn)
        # rebuilds it from the importable umbrella class and the schedule
        return _rebuild, (self._umbrella, self.schedule), self.__dict__


@functools.lru_cache(maxsize=None)
def _behaving_as(umbrella: type, named: type) -> type:
    """``umbrella`` (ProgressiveFreezing or a subclass of it) with ``named``'s behaviour: its
    methods first (a subclass's overrides still win), then the named callback's. It keeps the
    umbrella's names, so logs, messages, hyperparameters and ``isinstance`` read as before."""
    return type(umbrella.__name__, (umbrella, named),
                {"__module__": umbrella.__module__, "__qualname__": umbrella.__qualname__, "__doc__": umbrella.__doc__,
                 "_umbrella": umbrella})


def _rebuild(umbrella: type, schedule: str) -> ProgressiveFreezing:
    return object.__new__(_behaving_as(umbrella, SCHEDULES[schedule]))
