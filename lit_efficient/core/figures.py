"""Figures a person can read in TensorBoard's Images tab: matplotlib charts rendered to pictures of
at least 800×500 pixels, written on global rank 0 when a technique's state changes (a mask update,
a projection refresh, the end of an epoch or task), never on an ordinary step.

matplotlib is optional (``pip install "lit-efficient[figures]"``). Without it every figure is
skipped, with one message the first time one would have been drawn; scalars, histograms and text
are logged as before. Charts are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, so no
pyplot state is touched and no window opens.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_efficient.core.logs import metric_key, off_the_clock, tensorboard_writer

#: the smallest figure, in inches at :data:`DPI` (800×500 pixels); wide charts grow sideways
FIGURE_INCHES = (8.0, 5.0)
DPI = 100

_available: Optional[bool] = None


def figures_available() -> bool:
    """Whether matplotlib can be imported; says once, when it cannot, that figures are skipped."""
    global _available
    if _available is None:
        try:
            import matplotlib  # noqa: F401
            from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        except ImportError:
            _available = False
            rank_zero_warn("lit_efficient: matplotlib is not installed, so the TensorBoard figures are skipped "
                           "(pip install \"lit-efficient[figures]\"); scalars, histograms and text are still logged")
        else:
            _available = True
    return _available


#: once-an-epoch figures drawn over a long run, about: each costs ~0.3 s on a CPU and shows the history
#: so far, so redrawing a timeline every epoch of a 40-epoch run of 1-second epochs cost a third of it
EPOCH_FIGURES = 16


def run_epochs(trainer: "pl.Trainer") -> Optional[int]:
    """How many epochs the run has (``max_epochs``, or fewer when ``max_steps`` ends it first);
    None when neither bounds it."""
    epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    batches = trainer.num_training_batches
    if trainer.max_steps is not None and trainer.max_steps > 0 and batches and math.isfinite(batches):
        by_steps = math.ceil(trainer.max_steps / max(1, math.ceil(batches / trainer.accumulate_grad_batches)))
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    return epochs


def epoch_figure_due(trainer: "pl.Trainer") -> bool:
    """Whether a once-an-epoch figure is drawn in the current epoch: in every epoch of a run of up
    to :data:`EPOCH_FIGURES` epochs; in a longer one every ``ceil(epochs / 16)``-th and the last."""
    epochs = run_epochs(trainer)
    if epochs is None or epochs <= EPOCH_FIGURES:
        return True
    epoch = trainer.current_epoch
    ended = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
    return (epoch + 1) % math.ceil(epochs / EPOCH_FIGURES) == 0 or epoch >= epochs - 1 or ended


def figure_writer(trainer: "pl.Trainer") -> Optional[Any]:
    """The SummaryWriter to draw into (rank 0, a TensorBoardLogger, matplotlib installed); else None.

    Ask it first and build what a figure shows only when it is not None: other ranks and runs
    without TensorBoard then pay nothing."""
    writer = tensorboard_writer(trainer)
    if writer is None or not figures_available():
        return None
    return writer


def render(draw: Callable[[Any], None], width: float = FIGURE_INCHES[0],
           height: float = FIGURE_INCHES[1]) -> np.ndarray:
    """An H×W×3 uint8 picture of what ``draw(figure)`` puts on a fresh matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(width, FIGURE_INCHES[0]), max(height, FIGURE_INCHES[1])), dpi=DPI)
    canvas = FigureCanvasAgg(figure)
    draw(figure)
    figure.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def log_figure(trainer: "pl.Trainer", technique: str, name: str, draw: Callable[[Any], None],
               step: Optional[int] = None, width: float = FIGURE_INCHES[0], height: float = FIGURE_INCHES[1]) -> bool:
    """Draw a figure and write it as ``efficient/<technique>/<name>``; returns whether it was written."""
    writer = figure_writer(trainer)
    if writer is None:
        return False
    with off_the_clock(trainer):  # drawing is logging: it stays out of the throughput windows
        picture = render(draw, width, height)
        writer.add_image(metric_key(technique, name), picture, trainer.global_step if step is None else step,
                         dataformats="HWC")
    return True


def width_for(labels: int, per_label: float = 0.28) -> float:
    """Inches that keep ``labels`` names on an axis legible (at least the standard width)."""
    return max(FIGURE_INCHES[0], 1.5 + per_label * labels)


def _label_size(labels: int) -> float:
    return 9.0 if labels <= 16 else 7.0 if labels <= 48 else 5.5


# -- the charts every technique draws from ------------------------------------------------------------
def bar_chart(figure, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str,
              ylim: Optional[tuple[float, float]] = None, line: Optional[tuple[str, float]] = None,
              integer: bool = False) -> None:
    """:func:`bars` filling the whole figure."""
    bars(figure.add_subplot(1, 1, 1), labels, series, title, ylabel, ylim, line, integer)


def bars(axes, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str,
         ylim: Optional[tuple[float, float]] = None, line: Optional[tuple[str, float]] = None,
         integer: bool = False) -> None:
    """Grouped bars on ``axes``, one group per label (names on the x axis) and one colour per series;
    ``line=(label, y)`` adds a horizontal reference line; ``integer`` ticks counts only."""
    if integer:
        from matplotlib.ticker import MaxNLocator

        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    count = len(series)
    width = 0.8 / max(1, count)
    x = np.arange(len(labels))
    for i, (name, values) in enumerate(series.items()):
        axes.bar(x + (i - (count - 1) / 2) * width, list(values), width, label=name)
    if line is not None:
        axes.axhline(line[1], color="black", linestyle="--", linewidth=1, label=line[0])
    axes.set_xticks(x)
    axes.set_xticklabels(labels, rotation=90 if len(labels) > 6 else 0, fontsize=_label_size(len(labels)))
    axes.set_xlim(-0.6, len(labels) - 0.4)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)


def stacked_bars(axes, labels: Sequence[str], series: Mapping[str, Sequence[float]], title: str, xlabel: str,
                 ylabel: str) -> None:
    """Bars stacked per label (e.g. kept and removed fractions per epoch), one colour per series."""
    bottom = np.zeros(len(labels))
    for name, values in series.items():
        values = np.asarray(list(values), dtype=float)
        axes.bar(range(len(labels)), values, 0.7, bottom=bottom, label=name)
        bottom = bottom + values
    axes.set_xticks(range(len(labels)))
    axes.set_xticklabels(labels, rotation=90 if len(labels) > 12 else 0, fontsize=_label_size(len(labels)))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8)


def histogram(axes, values: torch.Tensor | np.ndarray, title: str, xlabel: str, bins: int = 50,
              threshold: Optional[tuple[str, float]] = None, color: Optional[str] = None, log: bool = False,
              label: Optional[str] = None, integer: bool = False) -> None:
    """A histogram of ``values`` on ``axes`` (call again on the same axes to overlay another, with
    its ``label``); ``threshold=(label, x)`` draws a vertical line; ``integer`` ticks counts only."""
    values = _numpy(values)
    if integer:
        from matplotlib.ticker import MaxNLocator

        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if values.size:
        axes.hist(values, bins=bins, color=color, alpha=0.85 if label is None else 0.6, log=log, label=label)
    if threshold is not None and math.isfinite(threshold[1]):
        axes.axvline(threshold[1], color="black", linestyle="--", linewidth=1.2, label=threshold[0])
    if label is not None or threshold is not None:
        axes.legend(fontsize=8)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("samples" if values.size else "none")
    axes.grid(alpha=0.3)


def line_chart(axes, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str, marker: str = "o") -> None:
    """One line per series, each given as ``(xs, ys)``."""
    for name, (xs, ys) in series.items():
        axes.plot(list(xs), list(ys), marker=marker, markersize=3, label=name)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        axes.legend(fontsize=8)


def matrix_chart(axes, matrix: torch.Tensor | np.ndarray, title: str, xlabel: str, ylabel: str,
                 row_labels: Sequence[str], column_labels: Sequence[str], vmin: float = 0.0, vmax: float = 100.0,
                 fmt: str = "{:.1f}") -> None:
    """A heat map with each cell's value written in it (NaN cells are left blank and grey)."""
    values = _numpy(matrix).astype(float)
    shown = np.ma.masked_invalid(values)
    image = axes.imshow(shown, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    image.cmap.set_bad("#dddddd")
    size = 10 if max(values.shape) <= 8 else 7 if max(values.shape) <= 16 else 5
    for (i, j), value in np.ndenumerate(values):
        if math.isfinite(value):
            bright = (value - vmin) / max(1e-12, vmax - vmin) > 0.6
            axes.text(j, i, fmt.format(value), ha="center", va="center", fontsize=size,
                      color="black" if bright else "white")
    axes.set_xticks(range(len(column_labels)))
    axes.set_xticklabels(column_labels, fontsize=8)
    axes.set_yticks(range(len(row_labels)))
    axes.set_yticklabels(row_labels, fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)


def thumbnails(figure, pictures: Sequence[tuple[str, torch.Tensor]], title: str, columns: int = 4) -> None:
    """Small grey pictures (e.g. masks: white = kept) side by side, each with its name."""
    columns = max(1, min(columns, len(pictures)))
    rows = max(1, math.ceil(len(pictures) / columns))
    for i, (name, picture) in enumerate(pictures):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(_numpy(picture), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        axes.set_title(name, fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(title)


def scatter_chart(axes, xs: torch.Tensor | np.ndarray, ys: torch.Tensor | np.ndarray, title: str, xlabel: str,
                  ylabel: str, line: Optional[tuple[str, float]] = None) -> None:
    """One point per ``(x, y)`` pair (e.g. a sample's weight against its loss); ``line=(label, y)``
    adds a horizontal reference line."""
    xs, ys = _numpy(xs), _numpy(ys)
    axes.scatter(xs, ys, s=12 if xs.size <= 512 else 4, alpha=0.7, edgecolors="none", label=f"{xs.size} points")
    if line is not None:
        axes.axhline(line[1], color="black", linestyle="--", linewidth=1, label=line[0])
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)


def pooled(picture: torch.Tensor, size: int = 64) -> torch.Tensor:
    """``picture`` (2-D, or more: flattened after the first dimension) averaged down to at most
    ``size``×``size`` cells, as floats in [0, 1]."""
    picture = picture.detach().float()
    picture = picture.reshape(picture.shape[0], -1) if picture.dim() != 2 else picture
    rows, cols = picture.shape
    kernel = (max(1, math.ceil(rows / size)), max(1, math.ceil(cols / size)))
    if kernel == (1, 1):
        return picture.cpu()
    return torch.nn.functional.avg_pool2d(picture[None, None], kernel, ceil_mode=True)[0, 0].cpu()


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values)


__all__ = ["DPI", "EPOCH_FIGURES", "FIGURE_INCHES", "bar_chart", "epoch_figure_due", "figure_writer",
           "figures_available", "histogram", "line_chart", "log_figure", "matrix_chart", "pooled", "render",
           "run_epochs", "scatter_chart", "stacked_bars", "thumbnails", "width_for"]
