"""What every benchmark script shares: the common command-line arguments, BASELINES.md's pydoc
Llama task, a step-timing callback and the mean ± std table cell."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Optional

import lightning.pytorch as pl


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (torch threads, default 1), ``--quick`` (a smoke test) and ``--root`` (scratch folder)."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lit_efficient_bench"))


# BASELINES.md's pydoc LM: Llama, d 256, 4 layers, vocab 2048; AdamW 1e-3, wd 0.1, cosine with 5% warm-up
PYDOC_LLAMA = dict(arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                   max_position_embeddings=128, tie_word_embeddings=False, lr=1e-3, weight_decay=0.1,
                   warmup_fraction=0.05)


def pydoc_llama(seed: int, model_class: Optional[type] = None) -> tuple[Any, Any]:
    """The BASELINES.md pydoc Llama (``model_class``, default ``CausalLM``) and its data (batch 16 × 128)."""
    from examples.nlp.data import PydocTextDataModule
    from examples.nlp.lm import CausalLM

    model = (model_class or CausalLM)(**PYDOC_LLAMA)
    return model, PydocTextDataModule(vocab_size=2048, seq_len=128, batch_size=16, seed=seed)


class Measure(pl.Callback):
    """Wall time of every training step (batch start to the end of every callback's batch end, so
    put it last) and the validation loss (with the optimizer step it came at) after every validation run."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.val_losses: list[float] = []
        self.val_steps: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._start)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
            self.val_steps.append(trainer.global_step)


def mean_std(values: list[Optional[float]], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of the values that are not None (one value alone, ``-`` for none)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
