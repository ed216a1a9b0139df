"""The savings table: each technique's rows, and how the table is formatted and logged.

Each callback reports what it saved as :class:`SavingsRow` s; at the end of ``fit`` the last of our
callbacks prints one table covering all of them on rank 0 and writes it to TensorBoard
(:class:`lit_efficient.core.callback.EfficientCallback`).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lightning.pytorch.callbacks import Callback

from lit_efficient.core.logs import metric_key


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


SAVINGS_FILE = "savings.md"


def write_savings_file(trainer: Any, table: str) -> Optional[str]:
    """Write ``table`` as ``savings.md`` in the run's directory (the first logger's version folder) on
    rank 0, readable without TensorBoard; its path (None on other ranks and without a logger: a run
    that keeps no logs gets no file in its working directory)."""
    if not trainer.is_global_zero:
        return None
    # the logger's own folder: ``Trainer.log_dir`` broadcasts it, a collective rank 0 alone would hang in
    folder = next((logger.log_dir for logger in trainer.loggers if getattr(logger, "log_dir", None)), None)
    if folder is None:
        return None
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SAVINGS_FILE)
    with open(path, "w") as f:
        f.write(f"# lit_efficient savings\n\nAt step {trainer.global_step}.\n\n{table}\n")
    return path


def savings_metrics(rows: Sequence[SavingsRow]) -> dict[str, float]:
    """The rows that are ratios, as metrics: ``efficient/report/<technique>/<quantity>``."""
    def slug(text: str) -> str:
        return "_".join("".join(c if c.isalnum() else " " for c in text).split())

    return {metric_key("report", f"{r.technique}/{slug(r.quantity)}"): float(r.ratio)
            for r in rows if r.ratio is not None}


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
