"""The accuracy matrix of a continual run: the accuracy on every task after each task, with
average accuracy and forgetting.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.figures import figure_writer, log_figure, matrix_chart
from lit_efficient.core.tasks import task_progress


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


def draw_accuracy_matrix(figure: Any, matrix: Tensor, key: str, after_task: int) -> None:
    """The accuracy matrix as a labelled heat map, each cell's accuracy written in it (grey: not
    trained yet), titled with the average accuracy and forgetting after ``after_task``."""
    n, average, forgot = matrix.shape[0], average_accuracy(matrix, after_task), forgetting(matrix, after_task)
    matrix_chart(figure.add_subplot(1, 1, 1), matrix, f"{key}: accuracy % on each task after task {after_task} "
                 f"(average {average:.1f}, forgetting {forgot:.1f})",
                 "evaluated on task", "after training task", [str(i) for i in range(n)], [str(j) for j in range(n)])


class AccuracyMatrix(EfficientCallback):
    """Records ``R[i, j]``, the validation accuracy on task ``j`` after training task ``i``.

    The module logs one accuracy per task, as a fraction, under ``"<key>/task<j>"`` (e.g.
    ``val/acc_cil/task3``);
    at the end of each task's last epoch this callback reads them into one matrix per key and
    reports the average accuracy over the tasks seen and the forgetting, as scalars
    (``efficient/continual/<key>/average``, ``.../forgetting``), and draws the matrix as a figure
    (``efficient/continual/<key>/matrix``: a heat map with each accuracy written in its cell, on
    rank 0, with matplotlib).

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
            if figure_writer(trainer) is not None:
                log_figure(trainer, self.technique, f"{key}/matrix",
                           lambda f, m=matrix: draw_accuracy_matrix(f, m, key, progress.task))
        if trainer.logger is not None:
            trainer.logger.log_metrics(scalars, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"matrices": {k: m.clone() for k, m in self.matrices.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.matrices = {k: m.clone() for k, m in state_dict["matrices"].items()}
