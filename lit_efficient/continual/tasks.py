"""Tasks in one fit: a datamodule that serves the current task's training data and every task's
validation data (the task protocol itself is :mod:`lit_efficient.core.tasks`).

Lightning reloads the training dataloader every epoch, and the task is a function of the epoch,
so everything Lightning already does keeps working: checkpoints, resume in the middle of a task,
DDP, loggers.
"""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lit_efficient.core.checks import check_int
from lit_efficient.core.seeding import epoch_generator
from lit_efficient.core.tasks import task_of_epoch


class ContinualDataModule(pl.LightningDataModule):
    """Base of datamodules that present a sequence of tasks in one fit.

    Subclasses implement :meth:`train_dataset` and :meth:`val_dataset` (and :meth:`task_classes`
    for Task-IL evaluation). Training data: the current task's; validation: one dataloader per task
    (``dataloader_idx`` = task), all tasks every time, so the accuracy matrix can be read off.

    Args:
        num_tasks: number of tasks (≥ 1).
        epochs_per_task: epochs of each task (≥ 1). Fit with ``max_epochs`` at most
            ``num_tasks * epochs_per_task``.
        batch_size: training and validation batch size.
        seed: seed of the training shuffle (epoch ``e`` shuffles with a generator seeded by ``seed`` and ``e``).
    """

    def __init__(self, num_tasks: int, epochs_per_task: int, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("num_tasks", num_tasks), ("epochs_per_task", epochs_per_task), ("batch_size", batch_size)):
            check_int(value, name, 1)
        self.num_tasks, self.epochs_per_task, self.batch_size, self.seed = num_tasks, epochs_per_task, batch_size, seed

    def train_dataset(self, task: int) -> Dataset:
        """The training samples of ``task`` (indices of this dataset are what data removal keys on)."""
        raise NotImplementedError

    def val_dataset(self, task: int) -> Dataset:
        """The validation samples of ``task``."""
        raise NotImplementedError

    def task_classes(self, task: int) -> Sequence[int]:
        """The labels of ``task`` (for Task-IL evaluation); override."""
        raise NotImplementedError

    @property
    def current_task(self) -> int:
        trainer = self.trainer
        return task_of_epoch(trainer.current_epoch if trainer is not None else 0, self.epochs_per_task,
                             self.num_tasks).task

    @override
    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if trainer is None or stage != "fit":
            return
        total = self.num_tasks * self.epochs_per_task
        if trainer.max_epochs is None or not 1 <= trainer.max_epochs <= total:
            raise ValueError(f"{type(self).__name__} has {self.num_tasks} tasks of {self.epochs_per_task} epochs: fit "
                             f"with `Trainer(max_epochs=...)` of at most {total}; got max_epochs={trainer.max_epochs}")
        # rebuilt every epoch: at task boundaries for the new data, and in between so that each epoch's
        # shuffle depends on the epoch alone (a run resumed mid-task sees the same order)
        trainer.reload_dataloaders_every_n_epochs = 1

    @override
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = epoch_generator(self.seed, epoch)
        return DataLoader(self.train_dataset(self.current_task), batch_size=self.batch_size, shuffle=True,
                          generator=generator)

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self.val_dataset(t), batch_size=256) for t in range(self.num_tasks)]
