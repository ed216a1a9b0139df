"""What every technique shows: namespaced scalars, TensorBoard histograms, images and text, and
throughput.

* Scalars go through ``pl_module.log`` under ``efficient/<technique>/<name>`` so any Lightning
  logger receives them (``self.log`` inside a compiled ``training_step`` crashes; callback hooks
  do not).
* Histograms, images and text need TensorBoard: they are written through the first
  ``TensorBoardLogger``'s ``experiment`` on global rank 0, and skipped when there is none.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_efficient.core.device import synchronize
from lit_efficient.core.lightning_internals import attached_trainer, logs_written_this_step, step_metric_step

NAMESPACE = "efficient"


Number = Union[int, float, torch.Tensor]


def metric_key(technique: str, name: str) -> str:
    """The logged name of ``name`` for ``technique``: ``efficient/<technique>/<name>``."""
    return f"{NAMESPACE}/{technique}/{name}"


def log_metrics(pl_module: "pl.LightningModule", technique: str, metrics: Mapping[str, Number], event: bool = False,
                **kwargs: Any) -> None:
    """Log scalars under the technique's namespace (per optimizer step unless ``kwargs`` say otherwise).

    Values must be the same on every rank (they are technique state, not per-rank statistics),
    so no synchronisation is requested. Lightning writes step metrics on its logging steps only;
    ``event=True`` marks the scalars of a one-off event (a mask update, a basis refresh), written
    to the loggers at this step even when it is not a logging step (otherwise an event every 200
    steps, at steps 201, 401, ..., would never reach a logger that writes every 50).
    """
    options = dict(on_step=True, on_epoch=False, batch_size=1, sync_dist=False)
    options.update(kwargs)
    if not _step_log_is_written(pl_module, options):
        if event:
            trainer = attached_trainer(pl_module)
            values = {metric_key(technique, name): float(value) for name, value in metrics.items()}
            for logger in trainer.loggers if trainer is not None else []:
                logger.log_metrics(values, step=step_metric_step(trainer))  # rank 0 only (Lightning's loggers)
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
    return logs_written_this_step(trainer)


def _step_log_is_written(pl_module: "pl.LightningModule", options: Mapping[str, Any]) -> bool:
    if not options.get("on_step") or options.get("on_epoch") or options.get("prog_bar"):
        return True
    return step_logs_due(attached_trainer(pl_module))


def tensorboard_writer(trainer: "pl.Trainer") -> Optional[Any]:
    """The ``SummaryWriter`` of the first TensorBoardLogger, on global rank 0; otherwise None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


_DRAWING_SECONDS = [0.0]  # this process's time spent drawing figures and histograms, since it started
_PICTURES = [0]  # and how many it drew


def drawing_clock() -> tuple[float, int]:
    """(seconds spent drawing figures and histograms, how many) in this process so far."""
    return _DRAWING_SECONDS[0], _PICTURES[0]


@contextmanager
def off_the_clock(trainer: "pl.Trainer") -> Iterator[None]:
    """Time what the block does (drawing a figure or a histogram, on an event step) and leave it out
    of every :class:`Throughput` window: it is logging, not training, and one callback's figures
    must not read as another's slow steps. The device is synchronised first, so the training work
    still queued stays on the clock."""
    synchronize(trainer.strategy.root_device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _DRAWING_SECONDS[0] += time.perf_counter() - start
        _PICTURES[0] += 1


def log_histogram(trainer: "pl.Trainer", technique: str, name: str, values: torch.Tensor,
                  step: Optional[int] = None) -> bool:
    """Write a histogram of ``values``; returns whether anything was written."""
    writer = tensorboard_writer(trainer)
    if writer is None or values.numel() == 0:
        return False
    step = trainer.global_step if step is None else step
    with off_the_clock(trainer):
        writer.add_histogram(metric_key(technique, name), values.detach().float().flatten().cpu(), step)
    return True


def log_image(trainer: "pl.Trainer", technique: str, name: str, image: torch.Tensor,
              step: Optional[int] = None) -> bool:
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


class Throughput:
    """Training samples per second over windows of steps.

    An ordinary step only adds its sample count; the clock is read, after waiting for the device
    (on a GPU the work runs behind the launches), when a window closes: on logging steps, when
    validation starts and at the end of each epoch, and when one opens again at the next training
    batch (so validation, the epoch's boundary — the loaders' start, other callbacks' epoch work —
    are left out). Time spent drawing figures and histograms (:func:`off_the_clock`) is left out
    too. So throughput costs a device sync only where the run syncs anyway.
    """

    def __init__(self) -> None:
        self.windows: list[tuple[int, float]] = []  # (samples, seconds) of every closed window
        self._samples = 0
        self._start: Optional[float] = None
        self._drawn = 0.0  # the drawing seconds of the process when the window opened

    @property
    def is_open(self) -> bool:
        return self._start is not None

    def start(self, device: torch.device) -> None:
        synchronize(device)
        self._samples, self._start, self._drawn = 0, time.perf_counter(), _DRAWING_SECONDS[0]

    def add(self, samples: int) -> None:
        self._samples += samples

    def close(self, device: torch.device, restart: bool = True) -> Optional[float]:
        """End the current window; its samples per second (None if no window was open or empty)."""
        if self._start is None:
            return None
        synchronize(device)
        seconds = time.perf_counter() - self._start - (_DRAWING_SECONDS[0] - self._drawn)
        rate = None
        if self._samples and seconds > 0:
            self.windows.append((self._samples, seconds))
            rate = self._samples / seconds
        self._samples, self._start = 0, (time.perf_counter() if restart else None)
        self._drawn = _DRAWING_SECONDS[0]
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
