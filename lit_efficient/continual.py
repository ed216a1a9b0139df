"""Continual learning in Lightning terms: tasks in one fit, a rehearsal buffer, the accuracy matrix.

The protocol is small on purpose. A sequence of ``num_tasks`` tasks is trained in one
``Trainer.fit`` of ``num_tasks × epochs_per_task`` epochs: epoch ``e`` belongs to task
``e // epochs_per_task``. A :class:`ContinualDataModule` serves the current task's training data
(Lightning reloads the training dataloader every epoch) and one validation dataloader
per task, so every validation shows every task. Because the task is a function of the epoch,
everything Lightning already does keeps working: checkpoints, resume in the middle of a task,
DDP, loggers. Callbacks see the boundary through :func:`task_progress`::

    progress = task_progress(trainer)        # None when the datamodule has no tasks
    if progress.epoch_in_task == 0: ...      # a new task starts this epoch

Any datamodule can join by exposing ``num_tasks`` and ``epochs_per_task`` (and, for Task-IL
evaluation, ``task_classes(task)``); :class:`ContinualDataModule` is the ready-made base.

Rehearsal (experience replay and DER++; Buzzega et al., "Dark Experience for General Continual
Learning", NeurIPS 2020, https://arxiv.org/abs/2004.07211) is a :class:`ReservoirBuffer` plus
:func:`rehearsal_loss`, usable from any ``training_step``. :class:`AccuracyMatrix` records the
accuracy on every task after each task and reports average accuracy and forgetting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lit_efficient.monitor import EfficientCallback, log_image
from lit_efficient.schedules import check_int, epoch_generator, host_int, pinned

Rehearsal = Literal["none", "er", "derpp"]


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


# -- rehearsal ----------------------------------------------------------------------------------------

class ReservoirBuffer:
    """A fixed-size memory of past samples filled by reservoir sampling (every sample seen so far
    has the same chance ``capacity / seen`` of being in it), with optional stored logits (DER).

    Args:
        capacity: number of samples kept (≥ 1).
        seed: seed of the reservoir draws and of :meth:`sample`.

    Each DDP rank keeps its own buffer of the samples it saw. State (tensors, counters, generator)
    goes through :meth:`state_dict`, loadable with ``torch.load(weights_only=True)``; save it from
    the module's ``on_save_checkpoint``.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        check_int(capacity, "capacity", 1)
        self.capacity = capacity
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.examples: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def slots(self, count: int) -> list[int]:
        """Reservoir slots for the next ``count`` samples (-1: not stored); advances ``seen``.
        Drawn on the host (a CPU generator): nothing waits for the device."""
        out = [-1] * count
        for i in range(count):
            if self.seen < self.capacity:
                out[i] = self.seen
            else:
                j = host_int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
                if j < self.capacity:
                    out[i] = j
            self.seen += 1
        return out

    @torch.no_grad()
    def add(self, examples: Tensor, labels: Tensor, logits: Optional[Tensor] = None) -> None:
        """Offer a batch to the reservoir."""
        if self.examples is None:
            self.examples = torch.zeros((self.capacity, *examples.shape[1:]), dtype=examples.dtype, device=examples.device)
            self.labels = torch.zeros((self.capacity, *labels.shape[1:]), dtype=labels.dtype, device=labels.device)
            if logits is not None:
                self.logits = torch.zeros((self.capacity, *logits.shape[1:]), dtype=torch.float32, device=logits.device)
        assert self.labels is not None
        slots = self.slots(examples.shape[0])
        source = [i for i, slot in enumerate(slots) if slot >= 0]
        if not source:
            return
        # page-locked copies: the indices reach the device without waiting for its stream
        target = pinned(torch.tensor([slots[i] for i in source])).to(self.examples.device, non_blocking=True)
        source = pinned(torch.tensor(source)).to(examples.device, non_blocking=True)
        self.examples[target] = examples.detach()[source]
        self.labels[target] = labels.detach()[source]
        if self.logits is not None and logits is not None:
            self.logits[target] = logits.detach().float()[source]

    def sample(self, count: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``count`` stored samples drawn without replacement (fewer if fewer are stored)."""
        if len(self) == 0 or self.examples is None or self.labels is None:
            raise ValueError("the rehearsal buffer is empty")
        chosen = torch.randperm(len(self), generator=self.generator)[: min(count, len(self))].to(self.examples.device)
        logits = self.logits[chosen] if self.logits is not None else None
        return self.examples[chosen], self.labels[chosen], logits

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "generator": self.generator.get_state(),
                "examples": self.examples, "labels": self.labels, "logits": self.logits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the checkpoint's rehearsal buffer holds {state['capacity']} samples, this one {self.capacity}")
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        self.examples, self.labels, self.logits = state["examples"], state["labels"], state["logits"]


def rehearsal_loss(forward: Callable[[Tensor], Tensor], buffer: ReservoirBuffer, batch_size: int,
                   method: Rehearsal = "derpp", alpha: float = 0.1, beta: float = 0.5) -> Optional[Tensor]:
    """The replay term to add to the current batch's loss (None while the buffer is empty).

    * ``"er"`` (experience replay): cross-entropy on a batch of stored samples.
    * ``"derpp"`` (DER++): ``alpha · MSE(f(x'), z')`` on stored logits ``z'`` plus
      ``beta · CE(f(x''), y'')`` on a second stored batch. Defaults are the DER++ paper's for
      Split CIFAR-10 with a 200-sample buffer (α = 0.1, β = 0.5).
    * ``"none"``: no replay.
    """
    if method not in ("none", "er", "derpp"):
        raise ValueError(f"`method` must be 'none', 'er' or 'derpp'; got {method!r}")
    if method == "none" or len(buffer) == 0:
        return None
    if method == "er":
        x, y, _ = buffer.sample(batch_size)
        return F.cross_entropy(forward(x), y)
    x1, _, z1 = buffer.sample(batch_size)
    if z1 is None:
        raise ValueError("DER++ replays logits: add them to the buffer (`buffer.add(x, y, logits)`)")
    x2, y2, _ = buffer.sample(batch_size)
    return alpha * F.mse_loss(forward(x1).float(), z1) + beta * F.cross_entropy(forward(x2), y2)


# -- evaluation ---------------------------------------------------------------------------------------

def average_accuracy(matrix: Tensor, after_task: Optional[int] = None) -> float:
    """Mean accuracy over tasks ``0..t`` after training task ``t`` (default: the last row filled)."""
    t = _last_row(matrix) if after_task is None else after_task
    return float(matrix[t, : t + 1].mean()) if t >= 0 else float("nan")


def forgetting(matrix: Tensor, after_task: Optional[int] = None) -> float:
    """Mean over tasks ``j < t`` of (best accuracy on ``j`` after learning it, before task ``t``) −
    (accuracy on ``j`` after task ``t``)."""
    t = _last_row(matrix) if after_task is None else after_task
    if t < 1:
        return 0.0
    drops = [float(matrix[j:t, j].max() - matrix[t, j]) for j in range(t)]
    return sum(drops) / len(drops)


def _last_row(matrix: Tensor) -> int:
    filled = (~torch.isnan(matrix)).any(dim=1).nonzero().flatten()
    return int(filled[-1]) if filled.numel() else -1


def matrix_image(matrix: Tensor) -> Tensor:
    """A 3×H×W image of an accuracy matrix in [0, 100] (bright = accurate, blue = not yet trained)."""
    values = (matrix.nan_to_num(-1.0) / 100).clamp(min=0)
    untrained = torch.isnan(matrix)
    image = torch.stack([values, values, torch.where(untrained, torch.full_like(values, 0.4), values)])
    return image.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)


class AccuracyMatrix(EfficientCallback):
    """Records ``R[i, j]``, the validation accuracy on task ``j`` after training task ``i``.

    The module logs one accuracy per task, as a fraction, under ``"<key>/task<j>"`` (e.g.
    ``val/acc_cil/task3``);
    at the end of each task's last epoch this callback reads them into one matrix per key and
    reports the average accuracy over the tasks seen and the forgetting, as scalars
    (``efficient/continual/<key>/average``, ``.../forgetting``) and as a TensorBoard image.

    Args:
        keys: metric prefixes to read (default Class-IL and Task-IL accuracy).
    """

    technique = "continual"

    def __init__(self, keys: Sequence[str] = ("val/acc_cil", "val/acc_til")) -> None:
        if isinstance(keys, str) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"`keys` must be a non-empty list of metric prefixes; got {keys!r}")
        self.keys = list(keys)
        self.matrices: dict[str, Tensor] = {}

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        progress = task_progress(trainer)
        if progress is None:
            raise ValueError("AccuracyMatrix needs a datamodule with `num_tasks` and `epochs_per_task`")
        n = progress.num_tasks
        for key in self.keys:
            if key not in self.matrices or self.matrices[key].shape != (n, n):
                self.matrices[key] = torch.full((n, n), float("nan"))
        super().setup(trainer, pl_module, stage)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        progress = task_progress(trainer)
        if trainer.sanity_checking or progress is None or not progress.is_last_epoch:
            return
        scalars = {}
        for key, matrix in self.matrices.items():
            for j in range(progress.num_tasks):
                value = trainer.callback_metrics.get(f"{key}/task{j}")
                if value is not None:
                    matrix[progress.task, j] = float(value) * 100.0  # logged as a fraction
            scalars[f"efficient/continual/{key}/average"] = average_accuracy(matrix, progress.task)
            scalars[f"efficient/continual/{key}/forgetting"] = forgetting(matrix, progress.task)
            log_image(trainer, self.technique, f"{key}/matrix", matrix_image(matrix))
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"matrices": {k: m.clone() for k, m in self.matrices.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.matrices = {k: m.clone() for k, m in state_dict["matrices"].items()}


__all__ = ["AccuracyMatrix", "ContinualDataModule", "ReservoirBuffer", "TaskProgress", "average_accuracy",
           "forgetting", "matrix_image", "rehearsal_loss", "require_task_progress", "task_of_epoch", "task_progress"]
