"""What every technique shows: namespaced scalars, TensorBoard histograms and images, and the
end-of-fit savings table.

* Scalars go through ``pl_module.log`` under ``efficient/<technique>/<name>`` so any Lightning
  logger receives them (``self.log`` inside a compiled ``training_step`` crashes; callback hooks
  do not).
* Histograms, images and text need TensorBoard: they are written through the first
  ``TensorBoardLogger``'s ``experiment`` on global rank 0, and skipped when there is none.
* Each of our callbacks derives from :class:`EfficientCallback` and reports what it saved as
  :class:`SavingsRow` s. At the end of ``fit`` the last of them prints one table covering all of
  them on rank 0, and writes it to TensorBoard as text.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_efficient.composition import Claim, check_composition
from lit_efficient.schedules import run_position

NAMESPACE = "efficient"
Number = Union[int, float, torch.Tensor]


def metric_key(technique: str, name: str) -> str:
    """The logged name of ``name`` for ``technique``: ``efficient/<technique>/<name>``."""
    return f"{NAMESPACE}/{technique}/{name}"


def log_metrics(pl_module: "pl.LightningModule", technique: str, metrics: Mapping[str, Number], **kwargs: Any) -> None:
    """Log scalars under the technique's namespace (per optimizer step unless ``kwargs`` say otherwise).

    Values must be the same on every rank (they are technique state, not per-rank statistics),
    so no synchronisation is requested.
    """
    options = dict(on_step=True, on_epoch=False, batch_size=1, sync_dist=False)
    options.update(kwargs)
    if not _step_log_is_written(pl_module, options):
        return
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float()
        pl_module.log(metric_key(technique, name), value, **options)


def step_logs_due(trainer: Optional["pl.Trainer"]) -> bool:
    """Whether Lightning writes step-level metrics at this training step. It writes them every
    ``log_every_n_steps`` only, and every ``self.log`` call costs ~1 ms on a CPU (it moves the result
    collection): logging on the other steps cost a 30 ms step ~10%. Outside training: True."""
    if trainer is None or not trainer.training or trainer.fast_dev_run:
        return True
    return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))


def _step_log_is_written(pl_module: "pl.LightningModule", options: Mapping[str, Any]) -> bool:
    if not options.get("on_step") or options.get("on_epoch") or options.get("prog_bar"):
        return True
    return step_logs_due(getattr(pl_module, "_trainer", None))


def tensorboard_writer(trainer: "pl.Trainer") -> Optional[Any]:
    """The ``SummaryWriter`` of the first TensorBoardLogger, on global rank 0; otherwise None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def log_histogram(trainer: "pl.Trainer", technique: str, name: str, values: torch.Tensor, step: Optional[int] = None) -> bool:
    """Write a histogram of ``values``; returns whether anything was written."""
    writer = tensorboard_writer(trainer)
    if writer is None or values.numel() == 0:
        return False
    step = trainer.global_step if step is None else step
    writer.add_histogram(metric_key(technique, name), values.detach().float().flatten().cpu(), step)
    return True


def log_image(trainer: "pl.Trainer", technique: str, name: str, image: torch.Tensor, step: Optional[int] = None) -> bool:
    """Write an image: ``image`` is HW (grey) or CHW (C = 1 or 3) with values in [0, 1]."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return False
    image = image.detach().float().clamp(0, 1).cpu()
    step = trainer.global_step if step is None else step
    writer.add_image(metric_key(technique, name), image, step, dataformats="HW" if image.dim() == 2 else "CHW")
    return True


def log_text(trainer: "pl.Trainer", technique: str, name: str, text: str, step: Optional[int] = None) -> bool:
    """Write markdown text (shown in TensorBoard's Text tab)."""
    writer = tensorboard_writer(trainer)
    if writer is None:
        return False
    writer.add_text(metric_key(technique, name), text, trainer.global_step if step is None else step)
    return True


def bar_image(values: Sequence[float], height: int = 32, gap: int = 1, width: int = 4) -> torch.Tensor:
    """A grey HW image with one vertical bar per value in [0, 1] (e.g. per-layer density)."""
    n = len(values)
    image = torch.zeros(height, max(1, n * (width + gap)))
    for i, value in enumerate(values):
        filled = int(round(min(1.0, max(0.0, float(value))) * height))
        if filled:
            image[height - filled :, i * (width + gap) : i * (width + gap) + width] = 1.0
    return image


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` to finish its queued work (nothing to wait for on a CPU)."""
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    if backend is not None and callable(getattr(backend, "synchronize", None)) and backend.is_available():
        backend.synchronize(device) if device.type == "cuda" else backend.synchronize()


class Throughput:
    """Training samples per second over windows of steps.

    An ordinary step only adds its sample count; the clock is read, after waiting for the device
    (on a GPU the work runs behind the launches), when a window closes: on logging steps, when
    validation starts (validation time is left out) and at the end of each epoch. So throughput
    costs a device sync only where the run syncs anyway.
    """

    def __init__(self) -> None:
        self.windows: list[tuple[int, float]] = []  # (samples, seconds) of every closed window
        self._samples = 0
        self._start: Optional[float] = None

    def start(self, device: torch.device) -> None:
        synchronize(device)
        self._samples, self._start = 0, time.perf_counter()

    def add(self, samples: int) -> None:
        self._samples += samples

    def close(self, device: torch.device, restart: bool = True) -> Optional[float]:
        """End the current window; its samples per second (None if no window was open or empty)."""
        if self._start is None:
            return None
        synchronize(device)
        seconds = time.perf_counter() - self._start
        rate = None
        if self._samples and seconds > 0:
            self.windows.append((self._samples, seconds))
            rate = self._samples / seconds
        self._samples, self._start = 0, (time.perf_counter() if restart else None)
        return rate

    def first_and_last_tenth(self) -> Optional[tuple[float, float]]:
        """Samples per second over the first and the last tenth of the windows (the very first, with
        the warm-up, left out); None with fewer than four windows."""
        if len(self.windows) < 4:
            return None
        tenth = max(1, (len(self.windows) - 1) // 10)

        def rate(windows: list[tuple[int, float]]) -> float:
            return sum(n for n, _ in windows) / sum(s for _, s in windows)

        return rate(self.windows[1 : 1 + tenth]), rate(self.windows[-tenth:])


@dataclass(frozen=True)
class SavingsRow:
    """One line of the savings table.

    Attributes:
        technique: short technique name (``"granet"``).
        quantity: what is measured (``"training FLOPs"``, ``"optimizer state"``).
        value: the measured value, formatted for people (``"90.0% sparse"``, ``"1.2 MB"``).
        ratio: cost relative to the baseline (0.3 = 30% of it), when it is a cost; else None.
        baseline: what ``ratio`` is relative to.
    """

    technique: str
    quantity: str
    value: str
    ratio: Optional[float] = None
    baseline: str = "dense"


def format_savings_table(rows: Sequence[SavingsRow]) -> str:
    """A markdown table of ``rows`` (readable as plain text too)."""
    header = ("technique", "quantity", "value", "vs baseline")
    body = [
        (r.technique, r.quantity, r.value, "" if r.ratio is None else f"{r.ratio:.3g}x {r.baseline}") for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (header, *body)) for i in range(len(header))]

    def fmt(line: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |"

    lines = [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(line) for line in body]
    return "\n".join(lines)


def savings_metrics(rows: Sequence[SavingsRow]) -> dict[str, float]:
    """The rows that are ratios, as metrics: ``efficient/report/<technique>/<quantity>``."""
    def slug(text: str) -> str:
        return "_".join("".join(c if c.isalnum() else " " for c in text).split())

    return {metric_key("report", f"{r.technique}/{slug(r.quantity)}"): float(r.ratio) for r in rows if r.ratio is not None}


def callback_settings(callbacks: Sequence[Callback]) -> dict[str, Any]:
    """Each callback's constructor arguments as plain values, ``<technique>/<argument>``."""
    settings: dict[str, Any] = {}
    for callback in callbacks:
        technique = getattr(callback, "technique", type(callback).__name__)
        for name in inspect.signature(type(callback).__init__).parameters:
            value = getattr(callback, name, None)
            if isinstance(value, (bool, int, float, str)):
                settings[f"{technique}/{name}"] = value
            elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
                settings[f"{technique}/{name}"] = ", ".join(map(str, value))
    return settings


def collect_savings(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
    """Rows from every :class:`EfficientCallback` of ``trainer``, in callback order."""
    rows: list[SavingsRow] = []
    for callback in efficient_callbacks(trainer):
        rows.extend(callback.savings(trainer, pl_module))
    return rows


def efficient_callbacks(trainer: "pl.Trainer") -> list["EfficientCallback"]:
    """Our callbacks of ``trainer``, in its order."""
    return [c for c in trainer.callbacks if isinstance(c, EfficientCallback)]


class EfficientCallback(Callback):
    """Base of every lit_efficient callback: its technique name, logging helpers, what it owns
    alone and its rows of the savings table.

    Subclasses that override ``setup`` call ``super().setup(...)`` once their targets are chosen:
    the last of our callbacks then checks that the combination can work
    (:func:`lit_efficient.composition.check_composition`). The last one also reports the savings
    table at the end of ``fit``.
    """

    technique: ClassVar[str] = "efficient"
    _trainer: Optional["pl.Trainer"] = None

    def position(self, step: int) -> int:
        """Optimizer step ``step`` in full-data steps, the clock every schedule reads
        (:func:`lit_efficient.schedules.run_position`: InfoBatch's shorter epochs do not stretch them)."""
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
        if callbacks and callbacks[-1] is self:
            check_composition(callbacks)

    def log_metrics(self, pl_module: "pl.LightningModule", metrics: Mapping[str, Number], **kwargs: Any) -> None:
        log_metrics(pl_module, self.technique, metrics, **kwargs)

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
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                        by_device.setdefault(grad.device, []).append(torch.isfinite(grad).all())
            finite = all(bool(torch.stack(flags).all()) for flags in by_device.values())  # one sync per device
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
        metrics = savings_metrics(rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # the HPARAMS tab: each run's settings beside its savings
                logger.log_hyperparams(callback_settings(callbacks), metrics=metrics)
            elif metrics:
                logger.log_metrics(metrics, step=trainer.global_step)


__all__ = [
    "EfficientCallback",
    "SavingsRow",
    "Throughput",
    "bar_image",
    "callback_settings",
    "collect_savings",
    "efficient_callbacks",
    "format_savings_table",
    "log_histogram",
    "log_image",
    "log_metrics",
    "log_text",
    "metric_key",
    "savings_metrics",
    "step_logs_due",
    "synchronize",
    "tensorboard_writer",
]
