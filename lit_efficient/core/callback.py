"""The base of every lit_efficient callback: its life-cycle, what it owns alone, the run clock it
reads, its logging and its rows of the savings table.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_efficient.core.clock import run_position
from lit_efficient.core.composition import Claim, check_composition
from lit_efficient.core.distributed import local_part
from lit_efficient.core.logs import Number, drawing_clock, log_metrics, log_text, step_logs_due
from lit_efficient.core.savings import (
    SavingsRow,
    callback_settings,
    format_savings_table,
    savings_metrics,
    write_savings_file,
)


def collect_savings(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
    """Rows from every :class:`EfficientCallback` of ``trainer``, in callback order, and what drawing
    the figures cost this process in the fit (a cost of watching, not of training: the throughput
    windows leave it out)."""
    callbacks = efficient_callbacks(trainer)
    rows: list[SavingsRow] = []
    for callback in callbacks:
        rows.extend(callback.savings(trainer, pl_module))
    start = getattr(callbacks[0], "_drawing_at_start", None) if callbacks else None
    if start is not None:
        seconds, pictures = (now - then for now, then in zip(drawing_clock(), start))
        if pictures:
            rows.append(SavingsRow("figures", "time drawing figures and histograms (this process)",
                                   f"{seconds:.1f} s for {pictures} pictures", None, ""))
    return rows


def efficient_callbacks(trainer: "pl.Trainer") -> list["EfficientCallback"]:
    """Our callbacks of ``trainer``, in its order."""
    return [c for c in trainer.callbacks if isinstance(c, EfficientCallback)]


def finite_flags(optimizer: torch.optim.Optimizer) -> tuple[dict[torch.device, list[torch.Tensor]], Any]:
    """Per device, whether each local gradient of ``optimizer``'s parameters is finite (device bools,
    no sync), and the group the gradients are sharded over (FSDP2; None: whole)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    shards = None  # FSDP2: each rank sees its shards of the gradients, and all must agree
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grad, shards_group = local_part(p.grad)
                shards = shards if shards_group is None else shards_group
                grad = grad.coalesce().values() if grad.is_sparse else grad
                by_device.setdefault(grad.device, []).append(torch.isfinite(grad).all())
    return by_device, shards


def all_finite(optimizer: torch.optim.Optimizer) -> Optional[torch.Tensor]:
    """Whether every gradient this rank holds of ``optimizer``'s parameters is finite, as a device
    bool (no sync: for work done on every step that an fp16 overflow step must skip); None when
    there is no gradient. Under FSDP2 it is this rank's shards only."""
    by_device, _ = finite_flags(optimizer)
    if not by_device:
        return None
    first = next(iter(by_device))
    return torch.stack([torch.stack(flags).all().to(first) for flags in by_device.values()]).all()


class EfficientCallback(Callback):
    """Base of every lit_efficient callback: its technique name, logging helpers, what it owns
    alone and its rows of the savings table.

    Subclasses that override ``setup`` call ``super().setup(...)`` once their targets are chosen:
    the last of our callbacks then checks that the combination can work
    (:func:`lit_efficient.core.composition.check_composition`). The last one also reports the savings
    table at the end of ``fit``.
    """

    technique: ClassVar[str] = "efficient"
    _trainer: Optional["pl.Trainer"] = None
    #: whether :meth:`show_progress` puts this technique in the progress bar (each callback's
    #: ``progress_bar`` argument)
    progress_bar: bool = True

    def position(self, step: int) -> int:
        """Optimizer step ``step`` in full-data steps, the clock every schedule reads
        (:func:`lit_efficient.core.clock.run_position`: InfoBatch's shorter epochs do not stretch them)."""
        return run_position(self._trainer, step) if self._trainer is not None else step

    def claims(self) -> list[Claim]:
        """What this callback must own alone in a Trainer (override; known after ``setup``)."""
        return []

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        callbacks = efficient_callbacks(trainer)
        if callbacks and callbacks[0] is self:
            self._drawing_at_start = drawing_clock()  # the fit's own drawing time, for the savings table
        if callbacks and callbacks[-1] is self:
            check_composition(callbacks)

    def log_metrics(self, pl_module: "pl.LightningModule", metrics: Mapping[str, Number], event: bool = False,
                    **kwargs: Any) -> None:
        log_metrics(pl_module, self.technique, metrics, event, **kwargs)

    def show_progress(self, pl_module: "pl.LightningModule", label: str, value: float) -> None:
        """This technique's entry in the progress bar (``label=value``, e.g. ``sparsity=0.9``), through
        Lightning's progress-bar metrics. Sent when it changes and on logging steps only: Lightning
        keeps showing the last value, and each ``log`` costs about a millisecond. Call it from a
        training-batch hook with a Python number (no device sync)."""
        if not self.progress_bar:
            return
        shown = self.__dict__.setdefault("_shown", {})
        if shown.get(label) == value and not step_logs_due(self._trainer):
            return
        shown[label] = value
        pl_module.log(label, float(value), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1,
                      sync_dist=False)

    def warn_once(self, key: str, message: str) -> None:
        """Warn (on rank 0) the first time ``key`` happens to this callback."""
        said = self.__dict__.setdefault("_warned", set())
        if key not in said:
            said.add(key)
            rank_zero_warn(message)

    def gradients_finite(self, optimizer: torch.optim.Optimizer, decision: str, step: int) -> bool:
        """Whether every gradient of ``optimizer``'s parameters is finite: read on a decision step only
        (one sync), in ``on_before_optimizer_step``.

        Under fp16 with a GradScaler an overflow step reaches ``on_before_optimizer_step`` with
        inf/NaN gradients somewhere, and the scaler then skips the whole optimizer step: no decision
        may be taken in it. Otherwise says once that ``decision`` moves on, and returns False."""
        memo = self.__dict__.get("_finite_at")
        if memo is not None and memo[0] == (id(optimizer), step):
            finite = memo[1]  # asked again in the same step (SparCL: mask update and gradient-mask refresh)
        else:
            by_device, shards = finite_flags(optimizer)
            if shards is None:
                finite = all(bool(torch.stack(flags).all()) for flags in by_device.values())  # one sync per device
            else:
                device = next(iter(by_device))  # FSDP2 keeps a rank's gradients on its one device
                everywhere = torch.stack([torch.stack(f).all().to(device) for f in by_device.values()]).all().int()
                dist.all_reduce(everywhere, op=dist.ReduceOp.MIN, group=shards)
                finite = bool(everywhere)
            self.__dict__["_finite_at"] = ((id(optimizer), step), finite)
        if not finite:
            self.warn_once("nonfinite", f"{type(self).__name__}: the gradients of optimizer step {step} were not "
                           f"finite (an fp16 overflow step, which a GradScaler skips): {decision} moved to the next "
                           "step whose gradients are finite (said once)")
        return finite

    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        """What this technique saved in the run that just ended (override)."""
        return []

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        callbacks = efficient_callbacks(trainer)
        if not callbacks or callbacks[-1] is not self:
            return
        rows = collect_savings(trainer, pl_module)
        if not rows:
            return
        table = format_savings_table(rows)
        rank_zero_info(f"lit_efficient savings:\n{table}")
        log_text(trainer, "report", "savings", table)
        write_savings_file(trainer, table)
        metrics = savings_metrics(rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: each run's settings beside its savings
                logger.log_hyperparams(callback_settings(callbacks), metrics=metrics)
            elif metrics:
                logger.log_metrics(metrics, step=trainer.global_step)
