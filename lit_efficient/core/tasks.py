"""Where a continual-learning run stands: the task protocol every task-aware technique reads.

A sequence of ``num_tasks`` tasks is trained in one ``Trainer.fit`` of
``num_tasks × epochs_per_task`` epochs: epoch ``e`` belongs to task ``e // epochs_per_task``. Any
datamodule joins by exposing ``num_tasks`` and ``epochs_per_task`` (and, for Task-IL evaluation,
``task_classes(task)``); :class:`lit_efficient.continual.ContinualDataModule` is the ready-made base.
Callbacks see the boundary through :func:`task_progress`::

    progress = task_progress(trainer)        # None when the datamodule has no tasks
    if progress.epoch_in_task == 0: ...      # a new task starts this epoch
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import lightning.pytorch as pl

from lit_efficient.core.time import Time


# -- the task protocol ------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskProgress:
    """Where a continual run stands: task ``task`` of ``num_tasks``, its epoch ``epoch_in_task``."""

    task: int
    epoch_in_task: int
    epochs_per_task: int
    num_tasks: int

    @property
    def is_first_epoch(self) -> bool:
        return self.epoch_in_task == 0

    @property
    def is_last_epoch(self) -> bool:
        return self.epoch_in_task == self.epochs_per_task - 1


def task_of_epoch(epoch: int, epochs_per_task: int, num_tasks: int) -> TaskProgress:
    """The task and epoch-within-task of global epoch ``epoch`` (epochs past the end stay in the last task)."""
    task = min(epoch // epochs_per_task, num_tasks - 1)
    return TaskProgress(task, epoch - task * epochs_per_task, epochs_per_task, num_tasks)


def task_progress(trainer: "pl.Trainer") -> Optional[TaskProgress]:
    """The current task of ``trainer``'s datamodule, or None if it does not describe tasks."""
    datamodule = getattr(trainer, "datamodule", None)
    num_tasks = getattr(datamodule, "num_tasks", None)
    epochs_per_task = getattr(datamodule, "epochs_per_task", None)
    if not isinstance(num_tasks, int) or not isinstance(epochs_per_task, int):
        return None
    return task_of_epoch(trainer.current_epoch, epochs_per_task, num_tasks)


def require_task_progress(trainer: "pl.Trainer", technique: str) -> TaskProgress:
    """:func:`task_progress`, or a clear error saying how to provide tasks."""
    progress = task_progress(trainer)
    if progress is None:
        raise ValueError(f"{technique} is for continual learning and needs task information: fit with a datamodule "
                         "exposing `num_tasks` and `epochs_per_task` (e.g. a "
                         "lit_efficient.continual.ContinualDataModule); got "
                         f"{type(getattr(trainer, 'datamodule', None)).__name__}")
    return progress


def task_time(spec: Union[float, str], argument: str, below_one: bool = False) -> Time:
    """A point or period within each task: a fraction of the task (``0.1`` or ``"0.1dur"``, in (0, 1],
    or (0, 1) with ``below_one``) or epochs of it (``"5ep"``, > 0). Errors name ``argument``."""
    parsed = Time.parse(spec, argument)
    if parsed.unit == "st":
        raise ValueError(f"`{argument}`={spec!r}: a time within a task is a fraction of it (0.1) or epochs ('5ep')")
    if parsed.value <= 0 or (below_one and parsed.unit == "dur" and parsed.value >= 1):
        bound = "(0, 1)" if below_one else "(0, 1]"
        raise ValueError(f"`{argument}` must be a fraction of a task in {bound} or epochs ('5ep'); got {spec!r}")
    return parsed


def task_epochs(time: Time, epochs_per_task: int) -> int:
    """A :func:`task_time` in whole epochs of a task of ``epochs_per_task`` (at least 1)."""
    if time.unit == "ep":
        return max(1, int(round(time.value)))
    return max(1, int(round(time.value * epochs_per_task)))
