"""Continual learning in Lightning terms: tasks in one fit (:mod:`~lit_efficient.continual.tasks`,
on the protocol of :mod:`lit_efficient.core.tasks`), rehearsal (:mod:`~lit_efficient.continual.rehearsal`)
and the accuracy matrix (:mod:`~lit_efficient.continual.metrics`)."""

from lit_efficient.continual.metrics import AccuracyMatrix, average_accuracy, draw_accuracy_matrix, forgetting
from lit_efficient.continual.rehearsal import Rehearsal, ReservoirBuffer, rehearsal_loss
from lit_efficient.continual.tasks import ContinualDataModule
from lit_efficient.core.tasks import TaskProgress, require_task_progress, task_of_epoch, task_progress

__all__ = ["AccuracyMatrix", "ContinualDataModule", "Rehearsal", "ReservoirBuffer", "TaskProgress",
           "average_accuracy", "draw_accuracy_matrix", "forgetting", "rehearsal_loss", "require_task_progress",
           "task_of_epoch", "task_progress"]
