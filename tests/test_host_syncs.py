"""No device-to-host synchronisation in an ordinary training step, for every callback.

On a GPU every ``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()`` or data-dependent shape
(``nonzero``, boolean-mask indexing) stalls the stream until the device catches up; a model with
100 targeted layers syncing once per layer per step would stall 100 times a step. On this CPU
nothing shows in a timing, so the calls are counted: the tensor methods that force a sync are
wrapped, and a call counts when the nearest frame of code that is not torch's own (or a numeric
library's) belongs to lit_efficient. Ten ordinary steps are watched — no logging step, no
scheduled update, no epoch boundary — and must make no such call. Logging and update steps may
sync, a bounded number of times; the frozen-output cache copies its row keys (32 bytes a row) to
the host once per forward through the frozen blocks, which decides which rows to run.
"""

import functools
import os
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import SET, GaLore, GraNet, InfoBatch, LossReweighting, NMSparsity, ProgressiveFreezing, RigL, SparCL
from tests.sparsity.sparse_helpers import MLP

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__import__("lit_efficient").__file__)))
LIBRARY = os.path.join(PACKAGE, "lit_efficient") + os.sep
TRANSPARENT = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, __import__("numpy")))

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def caller_is_ours() -> bool:
    """Whether the nearest frame outside torch and numpy (the code that asked) is lit_efficient's,
    other than ``host_int`` (which reads host tensors only, and checks that it does)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TRANSPARENT) and name != __file__:
            return name.startswith(LIBRARY) and frame.f_code.co_name != "host_int"
        frame = frame.f_back
    return False


class SyncCounter:
    """Counts lit_efficient's calls of the tensor methods that force a device-to-host sync while ``on``."""

    def __init__(self, monkeypatch):
        self.on, self.calls, self.copied = False, [], []  # copied: bytes of each .cpu()
        for name in SYNCING_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        monkeypatch.setattr(torch, "nonzero", self._wrap(torch.nonzero, "torch.nonzero"))
        getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__
        monkeypatch.setattr(torch.Tensor, "__getitem__", self._masked(getitem, "x[mask]"))
        monkeypatch.setattr(torch.Tensor, "__setitem__", self._masked(setitem, "x[mask] = v"))

    def _record(self, what):
        if self.on and caller_is_ours():
            frame = sys._getframe(2)
            while not frame.f_code.co_filename.startswith(LIBRARY):
                frame = frame.f_back
            self.calls.append(f"{what} at {os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno}")

    def _wrap(self, method, what):
        def counted(*args, **kwargs):
            self._record(what)
            if what == "cpu" and self.on and caller_is_ours():
                self.copied.append(args[0].numel() * args[0].element_size())
            return method(*args, **kwargs)

        return counted

    def _masked(self, method, what):
        def counted(tensor, index, *rest):
            items = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() for i in items):
                self._record(what)
            return method(tensor, index, *rest)

        return counted


class Watch(Callback):
    """Switches the counter on from the start of step ``first`` to the end of step ``last`` (placed
    first and last among the callbacks, so every other callback's hooks of those steps are inside)."""

    def __init__(self, counter, first, last, end):
        self.counter, self.first, self.last, self.end = counter, first, last, end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.end and trainer.global_step == self.first:
            self.counter.on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.end and trainer.global_step == self.last + 1:
            self.counter.on = False
            self.counter.steps += 1


FIRST, LAST = 4, 13  # ten steps, after the first step's probes and before any scheduled update
LATER = "30st"  # updates, refreshes and checks fall after the watched steps


def freezeout(**kwargs):
    # the first block freezes at step 2 of 64, so the watched steps run with a frozen prefix
    return ProgressiveFreezing(schedule="freezeout", t0=0.02, warp="linear", **kwargs)


ENTRIES = {
    "granet": lambda: [GraNet(sparsity=0.8, update_every=LATER, prune_end=0.8)],
    "granet_momentum": lambda: [GraNet(sparsity=0.8, update_every=LATER, prune_end=0.8, growth="momentum")],
    "rigl": lambda: [RigL(sparsity=0.8, update_every=LATER)],
    "set": lambda: [SET(sparsity=0.8, update_every=LATER)],
    "nm": lambda: [NMSparsity(n=2, m=4)],
    "freezeout": lambda: [freezeout()],
    "freezeout_lr_annealing": lambda: [freezeout(lr_annealing=True)],
    "adaptive": lambda: [ProgressiveFreezing(schedule="adaptive", freeze_start="2st", check_every=LATER)],
    "galore": lambda: [GaLore(rank=8, update_proj_gap=30)],
    "galore_fira": lambda: [GaLore(rank=8, update_proj_gap=30, fira=True)],
    "galore_random_8bit": lambda: [GaLore(rank=8, update_proj_gap=30, projection="random", eight_bit=True)],
    "infobatch": lambda: [InfoBatch(prune_ratio=0.5)],
    "loss_reweighting": lambda: [LossReweighting(warmup="2st")],
    "loss_reweighting_buckets": lambda: [LossReweighting(warmup="2st", timestep_buckets=4, num_timesteps=16)],
    "vit_main_job": lambda: [RigL(sparsity=0.8, update_every=LATER), InfoBatch(prune_ratio=0.5), freezeout()],
    "lm_main_job": lambda: [GaLore(rank=8, update_proj_gap=30), InfoBatch(prune_ratio=0.5), freezeout()],
    "ddpm_main_job": lambda: [GraNet(sparsity=0.8, update_every=LATER, prune_end=0.8),
                              LossReweighting(warmup="2st", timestep_buckets=4, num_timesteps=16), freezeout()],
}


class TimestepMLP(MLP):
    """The test MLP, reporting a timestep per sample as a diffusion model does."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        return {**out, "timesteps": (batch[0][:, 0].abs() * 5).long() % 16}


def fit(callbacks, counter, model=None, data=None, **kwargs):
    pl.seed_everything(0)
    model = model or TimestepMLP()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    data = data or DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=4, shuffle=True)  # 64 batches
    watch = lambda end: Watch(counter, FIRST, LAST, end)  # noqa: E731
    trainer = pl.Trainer(max_epochs=1, callbacks=[watch(False), *callbacks, watch(True)], logger=False,
                         log_every_n_steps=1000, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, data)
    return trainer


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_no_host_sync_in_an_ordinary_step(monkeypatch, name):
    counter = SyncCounter(monkeypatch)
    counter.steps = 0
    fit(ENTRIES[name](), counter)
    assert counter.steps == 1, "the watched steps did not run"
    assert counter.calls == [], f"{len(counter.calls)} host syncs in 10 ordinary steps: {counter.calls[:8]}"


def test_the_frozen_output_cache_copies_its_keys_once_per_forward(monkeypatch):
    """The keys as an accelerator computes them (on the CPU, blake2b reads the host bytes in place)."""
    from lit_efficient.freezing import cache

    monkeypatch.setattr(cache, "row_keys", functools.partial(cache.row_keys, on_device=True))
    counter = SyncCounter(monkeypatch)
    counter.steps = 0
    fit([freezeout(cache_frozen_mb=8)], counter)
    assert counter.steps == 1
    copies = [call for call in counter.calls if call.startswith("cpu")]
    assert 0 < len(copies) <= LAST - FIRST + 1, counter.calls  # at most one copy a step (it did serve)
    assert max(counter.copied) <= 32 * 4, counter.copied  # the keys of the batch's 4 rows, not the rows
    # and nothing else, but reading that host copy as numpy
    assert {call.split(" at ")[1] for call in counter.calls} == {copies[0].split(" at ")[1]}, counter.calls
    assert all(call.startswith(("cpu", "numpy")) and "freezing/cache" in call for call in counter.calls)


def test_sparcl_makes_no_host_sync_in_an_ordinary_step(monkeypatch):
    from examples.vision.continual import ContinualClassifier, SplitDigits

    counter = SyncCounter(monkeypatch)
    counter.steps = 0
    pl.seed_everything(0)
    watch = lambda end: Watch(counter, FIRST, LAST, end)  # noqa: E731
    sparcl = SparCL(sparsity=0.8, gradient_mask_every=30, mask_update_every=1.0)
    trainer = pl.Trainer(max_epochs=1, callbacks=[watch(False), sparcl, watch(True)], logger=False,
                         log_every_n_steps=1000, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(ContinualClassifier(method="derpp", buffer_size=50, width=8),
                datamodule=SplitDigits(num_tasks=2, epochs_per_task=1, batch_size=8))
    assert counter.steps == 1
    assert counter.calls == [], counter.calls


def test_the_counter_sees_a_per_step_item(monkeypatch):
    """The counter is not blind: a hook of ours that reads a tensor every step is caught (its code
    is compiled as if it lived in the package: only the file of the calling code decides)."""
    source = ("def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):\n"
              "    outputs['loss'].item()\n")
    namespace: dict = {}
    exec(compile(source, os.path.join(LIBRARY, "careless.py"), "exec"), namespace)
    careless = type("Careless", (Callback,), {"on_train_batch_end": namespace["on_train_batch_end"]})
    counter = SyncCounter(monkeypatch)
    counter.steps = 0
    fit([careless()], counter)
    assert len(counter.calls) == LAST - FIRST + 1 and counter.calls[0].startswith("item"), counter.calls
