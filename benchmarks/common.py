"""What every benchmark script shares: the common command-line arguments, the standard pydoc
Llama task, a step-timing callback, the mean ± std table cell, and turn-taking runs (several
trainings in their own processes sharing the machine in short alternating slices, so that its
speed drifting over minutes slows them all alike)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue as queue_module
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--threads`` (torch threads, default 1), ``--quick`` (a smoke test) and ``--root`` (scratch folder)."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--root", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lit_efficient_bench"))


# The standard pydoc LM: Llama, d 256, 4 layers, vocab 2048; AdamW 1e-3, wd 0.1, cosine with 5% warm-up
PYDOC_LLAMA = dict(arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
                   max_position_embeddings=128, tie_word_embeddings=False, lr=1e-3, weight_decay=0.1,
                   warmup_fraction=0.05)


def pydoc_llama(seed: int, model_class: Optional[type] = None, corpus: str = "pydoc") -> tuple[Any, Any]:
    """The standard pydoc Llama (``model_class``, default ``CausalLM``) and its data (batch 16 × 128);
    ``corpus="stdlib_docstrings"`` trains the same model on the larger, more mixed docstring corpus."""
    from examples.nlp.data import PydocTextDataModule
    from examples.nlp.lm import CausalLM

    model = (model_class or CausalLM)(**PYDOC_LLAMA)
    return model, PydocTextDataModule(corpus=corpus, vocab_size=2048, seq_len=128, batch_size=16, seed=seed)


class Measure(pl.Callback):
    """Wall time of every training step (batch start to the end of every callback's batch end, so
    put it last) and the validation loss (with the optimizer step it came at) after every validation run."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.samples = 0  # training samples (rows of the batch's first tensor) over all steps
        self.val_losses: list[float] = []
        self.val_steps: list[int] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_times.append(time.perf_counter() - self._start)
        self.samples += _batch_rows(batch)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))
            self.val_steps.append(trainer.global_step)


def _batch_rows(batch: Any) -> int:
    """Rows of the first tensor in a batch (a tensor, or a tuple/list/dict holding tensors)."""
    if hasattr(batch, "shape"):
        return int(batch.shape[0]) if len(batch.shape) else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    rows = (_batch_rows(item) for item in items if hasattr(item, "shape") or isinstance(item, (list, tuple, dict)))
    return next(rows, 0)


def mean_std(values: list[Optional[float]], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` of the values that are not None (one value alone, ``-`` for none)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


class Turns(pl.Callback):
    """One of several processes that run one at a time, handing the machine on at a training step
    boundary once they have held it for ``slice_s`` seconds. :attr:`held` is the time this process
    computed while holding it, so one fit's time excludes every wait for the others.

    Made by :func:`run_in_turns`; pass it to the Trainer *before* :class:`Measure` so that step times
    exclude the waits too."""

    def __init__(self, index: int, shared: tuple, slice_s: float) -> None:
        self.index, self.slice_s = index, slice_s
        self._condition, self._turn, self._done = shared
        self._held, self._since = 0.0, None

    @property
    def held(self) -> float:
        return self._held + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def acquire(self) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn.value == self.index)
        self._since = time.perf_counter()

    def _hand_on(self, finished: bool) -> None:
        self._held, self._since = self.held, None
        count = len(self._done)
        with self._condition:
            self._done[self.index] = finished
            following = [(self.index + k) % count for k in range(1, count + 1)]
            self._turn.value = next((i for i in following if not self._done[i]), self.index)
            self._condition.notify_all()

    def release_for_good(self) -> None:
        self._hand_on(finished=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if time.perf_counter() - self._since >= self.slice_s:
            self._hand_on(finished=False)
            self.acquire()


def _take_turns(index: int, shared: tuple, slice_s: float, barrier, function: Callable, arguments: tuple,
                queue) -> None:
    turns, result = Turns(index, shared, slice_s), None
    barrier.wait()  # every process has imported what it needs before the first turn
    turns.acquire()
    try:
        result = function(*arguments, turns=turns)
    finally:
        turns.release_for_good()
        queue.put((index, result))


def run_in_turns(function: Callable, argument_tuples: Sequence[tuple], slice_s: float = 0.5) -> list:
    """``function(*arguments, turns=Turns)`` for every tuple, each in its own (spawned) process,
    taking turns on the machine: only one computes at a time, each for ``slice_s`` seconds. The
    function must put ``turns`` among its Trainer's callbacks and time its fit with ``turns.held``;
    whatever it does before that (building the model, an untimed warm-up) runs in its turn but is
    not counted. Returns the results in the order of ``argument_tuples``."""
    context = multiprocessing.get_context("spawn")
    count = len(argument_tuples)
    shared = (context.Condition(), context.Value("i", 0, lock=False), context.Array("b", count, lock=False))
    barrier, queue = context.Barrier(count, timeout=900), context.Queue()
    processes = [context.Process(target=_take_turns, args=(i, shared, slice_s, barrier, function, arguments, queue))
                 for i, arguments in enumerate(argument_tuples)]
    for process in processes:
        process.start()
    results: dict = {}
    while len(results) < count:
        try:
            index, result = queue.get(timeout=5)
            results[index] = result
        except queue_module.Empty:
            if not any(process.is_alive() for process in processes):  # one died before it could report
                results.update({i: None for i in range(count) if i not in results})
    for process in processes:
        process.join()
    failed = [argument_tuples[i] for i in range(count) if results[i] is None]
    if failed:
        raise RuntimeError(f"turn-taking runs failed: {failed}")
    return [results[i] for i in range(count)]
