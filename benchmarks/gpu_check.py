"""GPU check: every lit_efficient callback, and the three main-job mixes, on one CUDA GPU.

    python benchmarks/gpu_check.py                               # everything, at most 8 min on one GPU
    python benchmarks/gpu_check.py --only rigl,vit_mix --steps 50 --out gpu_check.md
    python benchmarks/gpu_check.py --device cpu                  # dry run on CPU (debug, see below)

Without CUDA it prints one line saying it was skipped and exits 0. The test suite never runs it.

What it measures, each check catching its own exception (an ``error: ...`` row) so that one
failure does not hide the rest:

* **Training checks** — GraNet, RigL, SET, NMSparsity, SparCL, ProgressiveFreezing (FreezeOut,
  adaptive, FreezeOut serving frozen outputs from memory), LossReweighting, InfoBatch, GaLore
  (32-bit, 8-bit moments, random projection) and the main-job mixes (ViT = RigL + InfoBatch +
  FreezeOut, LM = GaLore + InfoBatch + FreezeOut, DDPM = GraNet + LossReweighting + FreezeOut, with
  the settings of ``examples/*/combined/*.yaml``), each in ``bf16-mixed`` and ``16-mixed`` (a real
  GradScaler). Models: the main-job digits ViT (``examples/vision/vit.py``), the pydoc Llama
  (``examples/nlp/lm.py``), the digits DDPM (``examples/vision/diffusion.py``) and, for SparCL,
  the Split-digits DER++ CNN (``examples/vision/continual.py``, 2 tasks). Every run takes
  5 warm-up steps, ``--steps`` timed steps (default 30) and 8 sync-counted steps. Reported:
  the median step time (``torch.cuda.synchronize`` before each clock read; from the first
  ``on_train_batch_start`` to the last ``on_train_batch_end``, so data loading is outside it)
  against the same model and data trained without callbacks, measured in the same run (a
  ``dense <model>`` row, measured right before the first check that needs it), and the
  device-to-host syncs per step: ``torch.cuda.set_sync_debug_mode("warn")`` warnings counted on
  ordinary steps (not next to a mask update or basis refresh; ``log_every_n_steps`` is out of
  reach), as the median over those steps. Schedules given as fractions of the run are squeezed into
  these few steps; intervals (``update_every``, GaLore's gap, adaptive freezing's ``check_every``)
  are ``steps // 3`` so that each runs a few times. The note shows what the run saved (the
  callbacks' own savings table); the 8-bit GaLore rows check that the moments are uint8 on the GPU.
* **nm_semi_structured** — NMSparsity 2:4 trained a few steps in ``16-true`` / ``bf16-true`` (the
  export needs half weights) on a Linear-heavy MLP (4 layers of 8192), then converted by
  ``NMSparsity.export()`` on the GPU, and its inference time against the same weights as dense
  fp16/bf16 tensors (``unsupported`` with the reason when this GPU or torch cannot convert or run
  it). The note also says what ``export_semi_structured=True`` converted at the end of ``fit`` and
  whether the weights are still semi-structured once ``fit`` has returned.
* **galore_memory** — peak ``torch.cuda.max_memory_allocated`` (above what was allocated before the
  model was built: weights, gradients, optimizer state, activations) over 4 optimizer steps of the
  GaLore paper's 130M Llama (hidden 768, 12 layers, intermediate 2048, vocab 32000; ~134M parameters,
  fp32 weights, random init, nothing downloaded) on batch 8 x 256 under bf16 autocast: torch AdamW, our
  GaLoreAdamW (rank 128, gap 200, scale 0.25, every attention/MLP matrix; 32-bit and 8-bit moments)
  and galore_torch's GaLoreAdamW at the same settings (a note if it is not installed).

A global time budget (``--budget-s``, default 480) skips the checks that no longer fit, as
``skipped (time)`` rows. At the end it prints one markdown table (check | setting | result | vs
dense/baseline | note), ready for ``benchmarks/RESULTS.md``, under the GPU name and the torch and
Lightning versions; ``--out`` writes the same to a file. Progress goes to stderr.

``--device cpu`` is a debugging dry run: every check runs on the CPU (the training checks in
``bf16-mixed`` only, for 2 steps or ``--steps``; the memory check on a tiny Llama), without the
CUDA-only parts (syncs, peak memory, the semi-structured kernels), to check that each one builds
and runs before a GPU is spent on it. Its times mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_BUDGET_S = 480.0
DEFAULT_STEPS = 30  # timed steps per run on CUDA
DRY_RUN_STEPS = 2  # with --device cpu
WARMUP_STEPS = 5
SYNC_STEPS = 8
CUDA_PRECISIONS = ("bf16-mixed", "16-mixed")
CPU_PRECISIONS = ("bf16-mixed",)
SYNC_MESSAGE = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") warns
SKIP_MESSAGE = ("gpu_check: skipped, no CUDA GPU available (run it on a CUDA machine; "
                "--device cpu is a dry run)")
HEADER = ("check", "setting", "result", "vs dense/baseline", "note")


# -- rows, the table, the budget (pure) ------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One line of the final table."""

    check: str
    setting: str
    result: str
    vs: str = ""
    note: str = ""


def _cell(text: Any) -> str:
    """A table cell: one line, with ``|`` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def format_table(rows: Sequence[Row]) -> str:
    """The markdown table of ``rows`` (header, separator, one line per row)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in (r.check, r.setting, r.result, r.vs, r.note)) + " |")
    return "\n".join(lines)


def error_row(check: str, setting: str, err: BaseException, limit: int = 300) -> Row:
    text = f"{type(err).__name__}: {err}"
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return Row(check, setting, f"error: {text}")


class Budget:
    """Seconds left of ``total_s`` since creation, on ``clock`` (injectable for tests)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s, self.clock = total_s, clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.total_s - self.elapsed()


@dataclass(frozen=True)
class Unit:
    """One (check, setting) to run: ``run()`` returns its rows; ``estimate_s`` is roughly how long it takes."""

    check: str
    setting: str
    run: Callable[[], Any]
    estimate_s: float = 10.0


def run_units(units: Sequence[Unit], budget: Budget, take_pending: Callable[[], list] = list,
              progress: Callable[[str], None] = lambda line: None) -> list[Row]:
    """Run every unit that still fits in the budget, each catching its own exception; the others
    become ``skipped (time)`` rows. A unit fits when the time left covers its ``estimate_s`` and
    what the check's previous setting took. ``take_pending`` returns rows produced on the side
    (dense baselines) to put before the unit's row."""
    rows: list[Row] = []
    took: dict[str, float] = {}  # check -> seconds its latest setting took
    for unit in units:
        left, needs = budget.left(), max(unit.estimate_s, took.get(unit.check, 0.0))
        if left < needs:
            rows.append(Row(unit.check, unit.setting, "skipped (time)", "",
                            f"{max(0.0, left):.0f} s of the budget left, needs ~{needs:.0f} s"))
            progress(f"{unit.check} [{unit.setting}]: skipped (time)")
            continue
        began = budget.clock()
        try:
            result = unit.run()
            produced = [result] if isinstance(result, Row) else list(result)
        except Exception as err:  # noqa: BLE001 - one check's failure must not hide the others
            traceback.print_exc(file=sys.stderr)
            produced = [error_row(unit.check, unit.setting, err)]
        rows.extend(take_pending())
        rows.extend(produced)
        took[unit.check] = budget.clock() - began
        progress(f"{unit.check} [{unit.setting}]: {produced[-1].result} ({budget.clock() - began:.1f} s, "
                 f"{budget.elapsed():.0f} s in all)")
    return rows


# -- steps and syncs (pure) -----------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """Steps of every training run: ``warmup`` untimed, ``timed``, then ``sync`` counted for syncs."""

    warmup: int
    timed: int
    sync: int

    @property
    def total(self) -> int:
        return self.warmup + self.timed + self.sync

    @property
    def every(self) -> int:
        """Interval (optimizer steps) of mask updates, basis refreshes and freezing checks: a few per run."""
        return max(1, self.timed // 3)


def step_plan(steps: int, device: str) -> StepPlan:
    return StepPlan(WARMUP_STEPS, steps, SYNC_STEPS) if device == "cuda" else StepPlan(0, steps, 0)


def step_phase(step: int, plan: StepPlan) -> str:
    """What the step that starts at ``global_step == step`` is for: warmup, timed, sync or after."""
    if step < plan.warmup:
        return "warmup"
    if step < plan.warmup + plan.timed:
        return "timed"
    if step < plan.total:
        return "sync"
    return "after"


def ordinary_step(step: int, every: int) -> bool:
    """Whether the step starting at ``global_step == step`` is neither a mask-update step (those end
    on a multiple of ``every``) nor a basis-refresh/check step (those start on one). With
    ``every`` <= 2 no step is clear of both, and every step counts."""
    if every <= 2:
        return True
    return step % every != 0 and (step + 1) % every != 0


def count_sync_warnings(records: Sequence[Any]) -> int:
    """How many of the recorded warnings (``warnings.WarningMessage`` or anything with a
    ``message``) are torch's sync-debug warnings."""
    return sum(1 for r in records if SYNC_MESSAGE in str(getattr(r, "message", r)))


def sync_summary(counts: Sequence[int]) -> Optional[tuple[float, int]]:
    """(median, max) of the per-step sync counts; None when nothing was counted."""
    if not counts:
        return None
    return float(statistics.median(counts)), max(counts)


def format_syncs(counts: Sequence[int]) -> str:
    summary = sync_summary(counts)
    if summary is None:
        return "syncs n/a"
    median, most = summary
    return f"{median:g} syncs/step" + (f" (max {most})" if most > median else "")


def format_ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.3g} ms/step" if ms < 100 else f"{ms:.0f} ms/step"


def versus_dense(step_s: float, syncs: Sequence[int], dense_step_s: float, dense_syncs: Sequence[int]) -> str:
    text = f"{step_s / dense_step_s:.2f}x time"
    mine, theirs = sync_summary(syncs), sync_summary(dense_syncs)
    if mine is not None and theirs is not None:
        text += f", {mine[0] - theirs[0]:+g} syncs"
    return text


# -- the command line (pure) ----------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=_positive(float), default=DEFAULT_BUDGET_S,
                        help=f"time budget in seconds; checks that no longer fit are skipped "
                             f"(default {DEFAULT_BUDGET_S:.0f})")
    parser.add_argument("--steps", type=_positive(int), default=None,
                        help=f"timed steps per training run (default {DEFAULT_STEPS}; "
                             f"{DRY_RUN_STEPS} with --device cpu)")
    parser.add_argument("--only", default=None, help=f"comma-separated checks to run, of: {', '.join(CHECKS)}")
    parser.add_argument("--out", default=None, help="also write the report (versions and table) to this file")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)  # cpu: dry run
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS if args.device == "cuda" else DRY_RUN_STEPS
    try:
        args.only = select_checks(args.only)
    except ValueError as err:
        parser.error(str(err))
    return args


def _positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def select_checks(only: Optional[str]) -> list[str]:
    """The checks named in ``--only`` (comma-separated), in registry order; all of them for None."""
    if only is None:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise ValueError(f"--only: unknown check(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(CHECKS)}")
    return [n for n in CHECKS if n in names]


def report(rows: Sequence[Row], info: Sequence[str]) -> str:
    """The versions/machine lines, a blank line and the table."""
    return "\n".join([*info, "", format_table(rows)]) + "\n"


# -- measuring a training run ---------------------------------------------------------------------

class SyncCapture:
    """Counts sync-debug warnings between ``start()`` and ``stop()`` (which returns the count)."""

    def __init__(self) -> None:
        self._context: Optional[warnings.catch_warnings] = None
        self._records: list = []

    def start(self) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._records = self._context.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> int:
        if self._context is None:
            return 0
        try:
            torch.cuda.set_sync_debug_mode(0)
            return count_sync_warnings(self._records)
        finally:
            self._context.__exit__(None, None, None)
            self._context, self._records = None, []


class StepProbe:
    """Times the timed steps and counts the syncs of the ordinary sync-window steps. Of its
    :meth:`callbacks`, the first goes before every other callback and the last after all of them."""

    def __init__(self, plan: StepPlan, cuda: bool, inspectors: Sequence[Callable[[Any, Any], str]] = ()) -> None:
        self.plan, self.cuda, self.inspectors = plan, cuda, tuple(inspectors)
        self.times: list[float] = []
        self.syncs: list[int] = []
        self.notes: list[str] = []  # what the inspectors said at the end of training
        self.failures: list[BaseException] = []  # and what they raised
        self._phase, self._start = "after", 0.0
        self._capture = SyncCapture()

    def callbacks(self) -> tuple[Any, Any]:
        """(first, last): Lightning callbacks that call :meth:`begin` and :meth:`end`."""
        import lightning.pytorch as pl

        probe = self

        class First(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe.begin(trainer.global_step)

            def on_exception(self, trainer, pl_module, exception):
                probe.close()

        class Last(pl.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                probe.end()

            def on_train_end(self, trainer, pl_module):
                probe.inspect(trainer, pl_module)

        return First(), Last()

    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def begin(self, step: int) -> None:
        self._phase = step_phase(step, self.plan)
        if self._phase == "timed":
            self._synchronize()
            self._start = time.perf_counter()
        elif self._phase == "sync" and self.cuda and ordinary_step(step, self.plan.every):
            self._capture.start()

    def end(self) -> None:
        if self._phase == "sync" and self._capture._context is not None:
            self.syncs.append(self._capture.stop())
        elif self._phase == "timed":
            self._synchronize()
            self.times.append(time.perf_counter() - self._start)
        self._phase = "after"

    def inspect(self, trainer: Any, pl_module: Any) -> None:
        """Run the inspectors at the end of training, while model and optimizer are still on the
        device (Lightning moves both to the CPU before ``on_fit_end``), after every other
        callback's ``on_train_end``."""
        for inspector in self.inspectors:
            try:
                note = inspector(trainer, pl_module)
            except Exception as err:  # noqa: BLE001 - reported in the check's row
                traceback.print_exc(file=sys.stderr)
                self.failures.append(err)
            else:
                if note:
                    self.notes.append(note)

    def close(self) -> None:
        self._capture.stop()


@dataclass
class Measurement:
    step_s: float
    syncs: list[int]
    notes: list[str] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)


def _models() -> dict[str, tuple[Callable[[StepPlan], tuple[Any, Any, int]], str]]:
    """Model name -> (builder(plan) -> (module, datamodule, max_epochs), description)."""
    return {
        "vit": (_vit, "main-job ViT on 8x8 digits (0.14M params, batch 64)"),
        "lm": (_lm, "pydoc Llama (d 256, 4 layers, 4.2M params, batch 16 x 128)"),
        "ddpm": (_ddpm, "digits DDPM, diffusers UNet 32/64 at 16x16, batch 64"),
        "continual": (_continual, "Split-digits DER++ CNN, 2 tasks, batch 32"),
    }


def _vit(plan: StepPlan):
    from examples.vision.data import DigitsDataModule
    from examples.vision.vit import ViTClassifier

    return ViTClassifier(), DigitsDataModule(batch_size=64, seed=0), 1000


def _lm(plan: StepPlan):
    from benchmarks.common import pydoc_llama

    model, data = pydoc_llama(0)
    return model, data, 1000


def _ddpm(plan: StepPlan):
    from examples.vision.data import DigitsDataModule
    from examples.vision.diffusion import DDPMDigits

    model = DDPMDigits(sample_size=16, channels=[32, 64], layers_per_block=1, attention=True, lr=1e-3)
    return model, DigitsDataModule(batch_size=64, seed=0), 1000


def _continual(plan: StepPlan):
    from examples.vision.continual import ContinualClassifier, SplitDigits

    # ~9 steps per epoch of a 2-class task at batch 32: enough epochs for the whole plan
    epochs_per_task = max(3, math.ceil(plan.total / (2 * 8)))
    model = ContinualClassifier(method="derpp", buffer_size=200, alpha=0.1, beta=0.5, lr=0.03, seed=0)
    return model, SplitDigits(num_tasks=2, epochs_per_task=epochs_per_task, batch_size=32, seed=0), 2 * epochs_per_task


class Context:
    """What the checks of one run share: device, step plan, scratch folder, dense baselines."""

    def __init__(self, device: str, plan: StepPlan, root: str) -> None:
        self.device, self.plan, self.root = device, plan, root
        self.cuda = device == "cuda"
        self.dense: dict[tuple[str, str], Any] = {}  # (model, precision) -> Measurement or the exception
        self.pending: list[Row] = []
        self.memory: dict[str, int] = {}  # galore_memory: method -> peak bytes

    @property
    def precisions(self) -> tuple[str, ...]:
        return CUDA_PRECISIONS if self.cuda else CPU_PRECISIONS

    def take_pending(self) -> list[Row]:
        rows, self.pending = self.pending, []
        return rows

    def fit(self, model_name: str, precision: str, callbacks: list,
            inspectors: Sequence[Callable[[Any, Any], str]] = ()) -> Measurement:
        """Train ``model_name`` with ``callbacks`` under ``precision`` for the plan's steps and
        measure them; ``inspectors(trainer, module)`` give notes at the end of training."""
        import lightning.pytorch as pl

        pl.seed_everything(0, verbose=False)
        build, _ = _models()[model_name]
        model, data, max_epochs = build(self.plan)
        probe = StepProbe(self.plan, self.cuda, (*inspectors, _finite_note, _scaler_note))
        first, last = probe.callbacks()
        trainer = pl.Trainer(accelerator="gpu" if self.cuda else "cpu", devices=1, precision=precision,
                             max_steps=self.plan.total, max_epochs=max_epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10**6,
                             callbacks=[first, *callbacks, last], default_root_dir=self.root)
        try:
            trainer.fit(model, datamodule=data)
        finally:
            probe.close()
        if not probe.times:
            raise RuntimeError(f"no timed step ran ({trainer.global_step} steps in all)")
        return Measurement(statistics.median(probe.times), probe.syncs, probe.notes, probe.failures)

    def dense_baseline(self, model_name: str, precision: str) -> Measurement:
        """The model without callbacks, measured once per run (and reported as a ``dense`` row)."""
        key = (model_name, precision)
        if key not in self.dense:
            check = f"dense {model_name}"
            try:
                m = self.fit(model_name, precision, [])
                if m.failures:
                    raise m.failures[0]
                self.dense[key] = m
                self.pending.append(Row(check, precision, f"{format_ms(m.step_s)}; {format_syncs(m.syncs)}",
                                        "reference", "; ".join([_models()[model_name][1], *m.notes])))
            except Exception as err:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                self.dense[key] = err
                self.pending.append(error_row(check, precision, err))
        result = self.dense[key]
        if isinstance(result, Exception):
            raise RuntimeError(f"the dense baseline failed ({type(result).__name__}: {result})")
        return result


# -- training checks ------------------------------------------------------------------------------
# One function per check: its callbacks, given the plan's interval in steps. The main-job mixes use
# the settings of examples/*/combined/*.yaml, with intervals shortened to the run's.

def granet(every: int) -> list:
    from lit_efficient import GraNet

    return [GraNet(sparsity=0.9, prune_start=0.0, prune_end=0.5, update_every=f"{every}st", regrow_fraction=0.5)]


def rigl(every: int) -> list:
    from lit_efficient import RigL

    return [RigL(sparsity=0.9, update_every=f"{every}st", drop_fraction=0.3, stop=0.75, distribution="erk")]


def set_(every: int) -> list:
    from lit_efficient import SET

    return [SET(sparsity=0.9, update_every=f"{every}st", drop_fraction=0.3, stop=0.75)]


def nm(every: int) -> list:
    from lit_efficient import NMSparsity

    return [NMSparsity(n=2, m=4, decay=2e-4)]


def sparcl(every: int) -> list:
    from lit_efficient import SparCL

    return [SparCL(sparsity=0.9, gradient_sparsity=0.8, removal_fraction=0.3, mask_update_every=0.4,
                   removal_points=[0.4], gradient_mask_every=2)]


def freezeout(every: int) -> list:
    from lit_efficient import ProgressiveFreezing

    return [ProgressiveFreezing(schedule="freezeout", t0=0.8, warp="cubic")]


def adaptive(every: int) -> list:
    from lit_efficient import ProgressiveFreezing

    return [ProgressiveFreezing(schedule="adaptive", freeze_start=0.3, check_every=f"{every}st", percentile=50.0,
                                freeze_level=0.75)]


def freezeout_cached(every: int) -> list:
    from lit_efficient import ProgressiveFreezing

    return [ProgressiveFreezing(schedule="freezeout", t0=0.8, warp="cubic", cache_frozen_mb=256)]


def loss_reweighting(every: int) -> list:
    from lit_efficient import LossReweighting

    return [LossReweighting(strategy="linupper", temperature=1.0, warmup=0.05)]


def infobatch(every: int) -> list:
    from lit_efficient import InfoBatch

    return [InfoBatch(prune_ratio=0.5, delta=0.875)]


def galore(every: int) -> list:
    from lit_efficient import GaLore

    return [GaLore(rank=64, update_proj_gap=every, scale=0.25)]


def galore_8bit(every: int) -> list:
    from lit_efficient import GaLore

    return [GaLore(rank=64, update_proj_gap=every, scale=0.25, eight_bit=True)]


def galore_random(every: int) -> list:
    from lit_efficient import GaLore

    return [GaLore(rank=64, update_proj_gap=every, scale=0.25, projection="random")]


def vit_mix(every: int) -> list:
    from lit_efficient import InfoBatch, ProgressiveFreezing, RigL

    return [RigL(sparsity=0.9, update_every=f"{every}st", stop=0.75), InfoBatch(prune_ratio=0.5, delta=0.875),
            ProgressiveFreezing(schedule="freezeout", t0=0.8, warp="cubic", cache_frozen_mb=256)]


def lm_mix(every: int) -> list:
    from lit_efficient import GaLore, InfoBatch, ProgressiveFreezing

    return [GaLore(rank=64, update_proj_gap=every, scale=0.25), InfoBatch(prune_ratio=0.5, delta=0.875),
            ProgressiveFreezing(schedule="freezeout", t0=0.8, warp="cubic")]


def ddpm_mix(every: int) -> list:
    from lit_efficient import GraNet, LossReweighting, ProgressiveFreezing

    return [GraNet(sparsity=0.8, prune_end=0.5, update_every=f"{every}st"),
            LossReweighting(strategy="linupper", warmup=0.05, timestep_buckets=10, timestep_key="timesteps",
                            num_timesteps=1000),
            ProgressiveFreezing(schedule="freezeout", t0=0.8, warp="cubic")]


def _finite_note(trainer: Any, module: Any) -> str:
    return "" if all(bool(torch.isfinite(p).all()) for p in module.parameters()) else "WARNING: non-finite weights"


def _scaler_note(trainer: Any, module: Any) -> str:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return "" if scaler is None else f"GradScaler scale {scaler.get_scale():g}"


def savings_note(trainer: Any, module: Any) -> str:
    """The first line each technique puts in the savings table."""
    from lit_efficient.core.callback import collect_savings

    seen, parts = set(), []
    for r in collect_savings(trainer, module):
        if r.technique not in seen:
            seen.add(r.technique)
            parts.append(f"{r.technique}: {r.quantity} {r.value}")
    return "; ".join(parts)


def eight_bit_note(trainer: Any, module: Any) -> str:
    """Checks that the GaLore moments are uint8 on the training device (raises otherwise)."""
    codes = [value for optimizer in trainer.optimizers for state in optimizer.state.values()
             for key, value in state.items() if key in ("exp_avg_q", "exp_avg_sq_q")]
    if not codes:
        raise RuntimeError("no 8-bit moments in the optimizer state")
    kinds = sorted({f"{c.dtype} on {c.device.type}" for c in codes})
    if any(c.dtype != torch.uint8 for c in codes):
        raise RuntimeError(f"8-bit moments are {', '.join(kinds)}, not uint8")
    if any(c.device != module.device for c in codes):
        raise RuntimeError(f"8-bit moments are {', '.join(kinds)}, not on the training device {module.device}")
    return f"moments {', '.join(kinds)} ({len(codes) // 2} matrices)"


@dataclass(frozen=True)
class TrainingCheck:
    model: str
    callbacks: Callable[[int], list]
    notes: tuple = (savings_note,)


TRAINING = {
    "granet": TrainingCheck("vit", granet),
    "rigl": TrainingCheck("vit", rigl),
    "set": TrainingCheck("vit", set_),
    "nm": TrainingCheck("vit", nm),
    "sparcl": TrainingCheck("continual", sparcl),
    "freezeout": TrainingCheck("vit", freezeout),
    "adaptive": TrainingCheck("vit", adaptive),
    "freezeout_cached": TrainingCheck("vit", freezeout_cached),
    "loss_reweighting": TrainingCheck("vit", loss_reweighting),
    "infobatch": TrainingCheck("vit", infobatch),
    "galore": TrainingCheck("lm", galore),
    "galore_8bit": TrainingCheck("lm", galore_8bit, (eight_bit_note, savings_note)),
    "galore_random": TrainingCheck("lm", galore_random),
    "vit_mix": TrainingCheck("vit", vit_mix),
    "lm_mix": TrainingCheck("lm", lm_mix),
    "ddpm_mix": TrainingCheck("ddpm", ddpm_mix),
}


def run_training_check(ctx: Context, name: str, precision: str) -> Row:
    check = TRAINING[name]
    dense = ctx.dense_baseline(check.model, precision)
    m = ctx.fit(check.model, precision, check.callbacks(ctx.plan.every), check.notes)
    measured = f"{format_ms(m.step_s)}; {format_syncs(m.syncs)}"
    vs = versus_dense(m.step_s, m.syncs, dense.step_s, dense.syncs)
    if m.failures:  # trained, but what it left behind is wrong: the row says so, the timing goes to the note
        return replace(error_row(name, precision, m.failures[0]), note="; ".join([measured, vs, *m.notes]))
    return Row(name, precision, measured, vs, "; ".join(m.notes))


# -- NMSparsity's 2:4 export and its inference speed -----------------------------------------------

def _linear_heavy_module(width: int, depth: int):
    import lightning.pytorch as pl
    from torch import nn

    class LinearHeavy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self(x).float(), y.float())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return LinearHeavy()


def time_forward(model: Any, x: torch.Tensor, cuda: bool, iterations: int = 20, repeats: int = 5) -> float:
    """Median seconds of one forward (mean over ``iterations``, median over ``repeats``)."""
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(iterations):
                model(x)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / iterations)
    return statistics.median(times)


def _train_nm(ctx: Context, precision: str, width: int, depth: int, export_semi_structured: bool):
    """The Linear-heavy MLP trained a few steps with NMSparsity 2:4 on every layer: (model, callback,
    how many weights the callback's own ``export`` converted during fit (None if it never ran), and
    what export warned)."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lit_efficient import NMSparsity

    pl.seed_everything(0, verbose=False)
    with torch.device("cuda" if ctx.cuda else "cpu"):  # 4 x 8192^2 weights are slow to initialise on a CPU
        model = _linear_heavy_module(width, depth)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, width, generator=g), torch.randn(512, width, generator=g)
    callback = NMSparsity(n=2, m=4, include=["net"], export_semi_structured=export_semi_structured)
    exported: list[int] = []
    export = callback.export
    callback.export = lambda: exported.append(export()) or exported[-1]  # what on_fit_end converted
    trainer = pl.Trainer(accelerator="gpu" if ctx.cuda else "cpu", devices=1, precision=precision,
                         max_steps=5 if ctx.cuda else 2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=10**6, callbacks=[callback], default_root_dir=ctx.root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=128))
    callback.export = export
    return model, callback, (exported[-1] if exported else None), _export_reasons(caught)


def _export_reasons(records: Sequence[Any]) -> list[str]:
    return [" ".join(str(w.message).split()).rstrip(".") for w in records if "NMSparsity.export" in str(w.message)]


def run_nm_semi_structured(ctx: Context, dtype_name: str) -> Row:
    """Both ways to get 2:4 weights: ``export_semi_structured=True`` (converted in ``on_fit_end``;
    the note says whether they are still sparse after ``fit``), and ``NMSparsity.export()`` called
    after ``fit`` on the model moved back to the GPU, whose model is then timed against the same
    weights as dense tensors."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    precision = {"float16": "16-true", "bfloat16": "bf16-true"}[dtype_name]  # export needs half weights
    width, depth, batch = (8192, 4, 8192) if ctx.cuda else (128, 4, 64)
    device = torch.device("cuda" if ctx.cuda else "cpu")
    sparse_class = torch.sparse.SparseSemiStructuredTensor

    def linears(model):
        return [m for m in model.net if isinstance(m, torch.nn.Linear)]

    flagged, _, in_fit, flag_reasons = _train_nm(ctx, precision, width, depth, export_semi_structured=True)
    kept = sum(isinstance(m.weight, sparse_class) for m in linears(flagged))
    flag_note = (f"export_semi_structured=True: {in_fit}/{depth} converted in on_fit_end, {kept} semi-structured "
                 f"after fit (model on {next(flagged.parameters()).device.type})")
    del flagged

    model, callback, _, _ = _train_nm(ctx, precision, width, depth, export_semi_structured=False)
    model = model.to(device).eval()  # fit leaves it on the CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = callback.export()
    reasons = _export_reasons(caught)
    if flag_reasons and not in_fit and flag_reasons[0] not in reasons:
        flag_note += f" ({flag_reasons[0][:200]})"
    layers = linears(model)
    for layer in layers:
        weight = layer.weight.to_dense() if isinstance(layer.weight, sparse_class) else layer.weight
        if int((weight.reshape(-1, 4) != 0).sum(1).max()) > 2:
            raise RuntimeError(f"the trained weights are not 2:4 sparse ({tuple(weight.shape)})")
    with device:
        dense = _linear_heavy_module(width, depth).to(dtype=dtype).eval()
    with torch.no_grad():
        for d, s in zip(linears(dense), layers):
            d.weight.copy_(s.weight.to_dense() if isinstance(s.weight, sparse_class) else s.weight)
            d.bias.copy_(s.bias)
    inputs = torch.randn(batch, width, device=device, dtype=dtype)
    dense_s = time_forward(dense, inputs, ctx.cuda)
    dense_text = f"dense {dense_s * 1000:.3g} ms per forward"
    if not converted:
        return Row("nm_semi_structured", dtype_name, "unsupported", dense_text,
                   "; ".join(reasons or ["NMSparsity.export() converted nothing"]) + f"; {flag_note}")
    try:
        sparse_s = time_forward(model, inputs, ctx.cuda)
        with torch.inference_mode():
            reference, output = dense(inputs).float(), model(inputs).float()
    except (RuntimeError, NotImplementedError) as err:
        return Row("nm_semi_structured", dtype_name, "unsupported", dense_text,
                   f"{converted}/{depth} Linear converted, but the sparse forward failed: {type(err).__name__}: "
                   f"{' '.join(str(err).split())[:200]}; {flag_note}")
    error = float((output - reference).norm() / reference.norm().clamp(min=1e-12))
    backend = "CUTLASS" if getattr(sparse_class, "_FORCE_CUTLASS", False) or not _cusparselt() else "cuSPARSELt"
    return Row("nm_semi_structured", dtype_name, f"{dense_s / sparse_s:.2f}x inference speed-up",
               f"{dense_text}, 2:4 {sparse_s * 1000:.3g} ms",
               f"NMSparsity.export() after fit: {converted}/{depth} Linear {width}x{width} ({backend}), batch "
               f"{batch}, output relative error {error:.1e}; {flag_note}")


def _cusparselt() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except AttributeError:
        return False


# -- GaLore peak memory on a 130M Llama -----------------------------------------------------------

GALORE_METHODS = ("torch AdamW", "lit_efficient GaLoreAdamW", "lit_efficient GaLoreAdamW 8-bit",
                  "galore_torch GaLoreAdamW")
GALORE_RANK, GALORE_GAP, GALORE_SCALE = 128, 200, 0.25


def _llama(cuda: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    if cuda:  # the GaLore paper's 130M Llama
        config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=256, tie_word_embeddings=False)
        return LlamaForCausalLM(config), (8, 256), GALORE_RANK
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(config), (2, 32), 16


def galore_optimizer(method: str, model: Any, rank: int):
    """The optimizer of ``method`` for ``model``: GaLore on every attention/MLP Linear, AdamW for the rest."""
    from lit_efficient import GaLoreAdamW
    from lit_efficient.core.targets import select_targets

    if method == "torch AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    matrices = {id(t.param): t.param for t in select_targets(model, ["all-linear"], kinds=("linear",))}
    rest = [p for p in model.parameters() if id(p) not in matrices]
    projected = {"params": list(matrices.values()), "rank": rank, "update_proj_gap": GALORE_GAP,
                 "scale": GALORE_SCALE, "proj_type": "std"}
    if method == "galore_torch GaLoreAdamW":
        from galore_torch import GaLoreAdamW as ReferenceAdamW

        return ReferenceAdamW([{"params": rest}, projected], lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
    if method.endswith("8-bit"):
        projected["eight_bit"] = True
    return GaLoreAdamW([{"params": rest}, projected], lr=1e-3, weight_decay=0.0)


def run_galore_memory(ctx: Context, method: str) -> Row:
    from lit_efficient.lowrank.optim import state_bytes

    if method == "galore_torch GaLoreAdamW":
        try:
            import galore_torch  # noqa: F401
        except ImportError as err:
            return Row("galore_memory", method, "skipped", "", f"galore_torch is not importable ({err})")
    device = torch.device("cuda" if ctx.cuda else "cpu")
    if ctx.cuda:  # count from here: what earlier checks left allocated is not this method's
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    with device:  # initialised on the GPU: much faster than 134M parameters on the CPU
        model, (batch, seq), rank = _llama(ctx.cuda)
    model = model.to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    optimizer = galore_optimizer(method, model, rank)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    steps = 4 if ctx.cuda else 1
    times = []
    try:
        for _ in range(steps):
            if ctx.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            if ctx.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"loss is {float(loss.detach())}")
        if method == "galore_torch GaLoreAdamW":
            from benchmarks.galore import reference_state_bytes

            state = reference_state_bytes(optimizer, list(model.parameters()))
        else:
            state = state_bytes(optimizer)
        peak = torch.cuda.max_memory_allocated() - before if ctx.cuda else None
    finally:
        del model, optimizer
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    step_ms = statistics.median(times[1:] or times) * 1000
    note = (f"{parameters / 1e6:.3g}M params, batch {batch} x {seq}, bf16 autocast; optimizer state "
            f"{state / 2**20:.3g} MiB; step {step_ms:.0f} ms{' (median after the first)' if len(times) > 1 else ''}")
    if method != "torch AdamW":
        note += f"; rank {rank}, gap {GALORE_GAP}, scale {GALORE_SCALE}"
    if peak is None:
        return Row("galore_memory", method, "peak n/a (CPU)", "", note)
    ctx.memory[method] = peak
    baseline = ctx.memory.get("torch AdamW")
    vs = "reference" if method == "torch AdamW" else (f"{peak / baseline:.3f}x AdamW peak" if baseline else "n/a")
    return Row("galore_memory", method, f"peak {peak / 2**30:.2f} GiB", vs, note)


# -- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """A check: ``run(ctx, setting)`` gives its row(s) for each of ``settings(ctx)``."""

    run: Callable[[Context, str], Any]
    settings: Callable[[Context], Sequence[str]]
    estimate_s: float


def _training_check(name: str) -> Check:
    return Check(lambda ctx, precision: run_training_check(ctx, name, precision), lambda ctx: ctx.precisions, 8.0)


CHECKS: dict[str, Check] = {
    **{name: _training_check(name) for name in TRAINING},
    "nm_semi_structured": Check(run_nm_semi_structured, lambda ctx: ("float16", "bfloat16"), 15.0),
    "galore_memory": Check(run_galore_memory, lambda ctx: GALORE_METHODS, 20.0),
}


def plan_units(ctx: Context, names: Sequence[str]) -> list[Unit]:
    """One unit per (check, setting), in registry order."""
    def run(check: Check, setting: str) -> Any:
        try:
            return check.run(ctx, setting)
        finally:  # what one check leaves on the GPU must not crowd the next
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()

    return [Unit(name, setting, lambda c=CHECKS[name], s=setting: run(c, s), CHECKS[name].estimate_s)
            for name in names for setting in CHECKS[name].settings(ctx)]


# -- main -----------------------------------------------------------------------------------------

def environment_lines(ctx: Context, args: argparse.Namespace, seconds: float) -> list[str]:
    import lightning

    if ctx.cuda:
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        machine = f"GPU: {torch.cuda.get_device_name(index)} (sm{major}{minor}), CUDA {torch.version.cuda}"
    else:
        machine = f"CPU dry run ({os.cpu_count()} cores): no GPU used"
    return [f"{machine}; torch {torch.__version__}, Lightning {lightning.__version__}",
            f"`python benchmarks/gpu_check.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` — "
            f"{time.strftime('%Y-%m-%d %H:%M')}, {ctx.plan.warmup} warm-up + {ctx.plan.timed} timed + "
            f"{ctx.plan.sync} sync-counted steps per run, intervals {ctx.plan.every} steps; "
            f"{seconds:.0f} s of a {args.budget_s:.0f} s budget"]


def _quiet() -> None:
    """Keep Lightning's per-fit chatter (device lines, savings tables, worker hints) out of the output."""
    import lightning.pytorch  # noqa: F401  (importing it sets its loggers to INFO: first import, then lower)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    budget = Budget(args.budget_s)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet()
    ctx = Context(args.device, step_plan(args.steps, args.device), tempfile.mkdtemp(prefix="lit_efficient_gpu_check_"))
    if ctx.cuda:
        torch.zeros(1, device="cuda")  # initialise CUDA before the clock of the first check
    rows = run_units(plan_units(ctx, args.only), budget, ctx.take_pending,
                     progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = report(rows, environment_lines(ctx, args, budget.elapsed()))
    print(text, end="")
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
