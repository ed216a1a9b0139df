"""Continual learning on Split-digits: 5 tasks of 2 classes, a small CNN, ER or DER++ rehearsal.

``SplitDigits`` cuts the digits task of ``examples/vision/data.py`` (same 1437/360 split) into tasks of
classes (0, 1), (2, 3), …, (8, 9), presented one after another in one fit
(:class:`lit_efficient.continual.ContinualDataModule`). ``ContinualClassifier`` trains a small
CNN with SGD on the current task plus a replay term from a reservoir buffer (``"er"``, ``"derpp"``
or ``"none"`` for plain fine-tuning) and validates every task each epoch in two settings:
Class-IL (argmax over all 10 classes) and Task-IL (argmax over the task's 2 classes), logged as
``val/acc_cil/task<j>`` and ``val/acc_til/task<j>``; :class:`lit_efficient.continual.AccuracyMatrix`
turns them into the accuracy matrix, average accuracy and forgetting.

``training_step`` returns the per-sample contract plus what SparCL's data removal reads::

    {"loss": ..., "sample_losses": losses, "sample_correct": correct, "extra_loss": replay}

Run from the repository root::

    lit-efficient fit --config examples/vision/continual_digits.yaml
    lit-efficient fit --config examples/vision/continual_digits.yaml --config examples/vision/sparcl/sparcl.yaml
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from examples.vision.data import DigitsDataModule
from lit_efficient.continual.rehearsal import ReservoirBuffer, rehearsal_loss
from lit_efficient.continual.tasks import ContinualDataModule


class SplitDigits(ContinualDataModule):
    """The digits split into tasks of ``classes_per_task`` consecutive labels.

    Args:
        num_tasks: number of tasks (default 5; at most ``10 // classes_per_task``).
        classes_per_task: labels per task (default 2).
        epochs_per_task: epochs of each task (default 10).
        batch_size: batch size (default 32).
        seed: seed of the training shuffle.
        split_seed: seed of the train/validation permutation (the standard task's: 0).
    """

    def __init__(self, num_tasks: int = 5, classes_per_task: int = 2, epochs_per_task: int = 10, batch_size: int = 32,
                 seed: int = 0, split_seed: int = 0) -> None:
        super().__init__(num_tasks, epochs_per_task, batch_size, seed)
        if not 1 <= classes_per_task or num_tasks * classes_per_task > 10:
            raise ValueError(f"`num_tasks` × `classes_per_task` must be at most 10 labels; "
                             f"got {num_tasks} × {classes_per_task}")
        self.classes_per_task, self.split_seed = classes_per_task, split_seed
        self._train: Optional[list[TensorDataset]] = None
        self._val: Optional[list[TensorDataset]] = None

    def task_classes(self, task: int) -> Sequence[int]:
        return list(range(task * self.classes_per_task, (task + 1) * self.classes_per_task))

    def _load(self) -> None:
        if self._train is not None:
            return
        digits = DigitsDataModule(split_seed=self.split_seed)
        x_tr, y_tr, x_va, y_va = digits._load_digits()
        self._train, self._val = [], []
        for task in range(self.num_tasks):
            labels = torch.tensor(self.task_classes(task))
            keep_tr, keep_va = torch.isin(y_tr, labels), torch.isin(y_va, labels)
            self._train.append(TensorDataset(x_tr[keep_tr], y_tr[keep_tr]))
            self._val.append(TensorDataset(x_va[keep_va], y_va[keep_va]))

    def train_dataset(self, task: int) -> Dataset:
        self._load()
        assert self._train is not None
        return self._train[task]

    def val_dataset(self, task: int) -> Dataset:
        self._load()
        assert self._val is not None
        return self._val[task]


class SmallCNN(nn.Module):
    """conv 1→w (stem) · conv w→2w · pool · conv 2w→4w · pool · fc 16w→8w · head 8w→classes, each conv
    followed by GroupNorm and ReLU. Without normalisation the net loses the ability to learn a second
    task after fitting the first (its ReLUs die); BatchNorm's running statistics drift with the
    task and with small last batches (validation accuracy then swings by tens of points from one
    epoch to the next), GroupNorm has none."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.norm0 = nn.GroupNorm(8, width)
        self.conv1 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(8, 2 * width)
        self.conv2 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(8, 4 * width)
        self.fc = nn.Linear(4 * width * 2 * 2, 8 * width)
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm0(self.stem(x)))
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class ContinualClassifier(LightningModule):
    """A classifier trained task after task with optional rehearsal.

    Args:
        method: ``"derpp"`` (default), ``"er"`` or ``"none"``.
        buffer_size: samples in the reservoir buffer (default 200).
        alpha, beta: DER++ weights of the logit and label replay (defaults 0.1, 0.5).
        lr: SGD learning rate, constant (default 0.03, the DER++ paper's for Split CIFAR-10).
        momentum: SGD momentum (default 0, as in the DER++ paper).
        num_classes, width: the network.
        seed: seed of the buffer's draws.
    """

    def __init__(self, method: Literal["none", "er", "derpp"] = "derpp", buffer_size: int = 200, alpha: float = 0.1,
                 beta: float = 0.5, lr: float = 0.03, momentum: float = 0.0, num_classes: int = 10, width: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        if method not in ("none", "er", "derpp"):
            raise ValueError(f"`method` must be 'none', 'er' or 'derpp'; got {method!r}")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0; got {lr}")
        self.save_hyperparameters()
        self.model = SmallCNN(num_classes, width)
        self.buffer = ReservoirBuffer(buffer_size, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = losses.mean()
        hp = self.hparams
        replay = rehearsal_loss(self, self.buffer, x.shape[0], hp.method, hp.alpha, hp.beta)
        output = {"sample_losses": losses, "sample_correct": logits.detach().argmax(1) == y}
        if replay is not None:
            loss = loss + replay
            output["extra_loss"] = replay
        if hp.method != "none":
            self.buffer.add(x, y, logits.detach() if hp.method == "derpp" else None)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return {"loss": loss, **output}

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        classes = torch.tensor(self.trainer.datamodule.task_classes(dataloader_idx), device=logits.device)
        cil = (logits.argmax(1) == y).float().mean()
        til = (classes[logits[:, classes].argmax(1)] == y).float().mean()
        options = dict(on_step=False, on_epoch=True, add_dataloader_idx=False, batch_size=x.shape[0], sync_dist=True)
        self.log(f"val/acc_cil/task{dataloader_idx}", cil, **options)
        self.log(f"val/acc_til/task{dataloader_idx}", til, **options)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rehearsal_buffer"] = self.buffer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rehearsal_buffer" in checkpoint:
            self.buffer.load_state_dict(checkpoint["rehearsal_buffer"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
