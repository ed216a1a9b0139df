"""What every freezing callback shares: the blocks, the prefix check, freezing a prefix, the
frozen-output cache, throughput, the savings rows, logging and checkpoint state.

A model is cut into blocks in forward order; block 0 carries everything upstream of the first
block (patch embedding and class/position tokens, token embeddings, a UNet's ``conv_in`` and time
embedding). Only a *prefix* is ever frozen: then no parameter upstream of the frozen blocks needs
a gradient, autograd records nothing for them, and the whole backward through them disappears —
unlike freezing leaf modules in the middle, which saves only their weight gradients (Composer's
LayerFreezing, ~5%). Frozen blocks also run under ``torch.no_grad()`` (so a tied embedding that
keeps training through the output head does not pull the backward back in), their parameters
leave the optimizer with their state freed, and by default they run in eval mode so BatchNorm
statistics stop moving.

:class:`BlockFreezing` does all of that; a subclass says only how many blocks are frozen after a
given optimizer step (:meth:`BlockFreezing.frozen_at`), plus the hooks its rule needs:
:class:`~lit_efficient.freezing.freezeout.FreezeOut`,
:class:`~lit_efficient.freezing.autofreeze.AutoFreeze`,
:class:`~lit_efficient.freezing.linear.LinearFreezing`. Freezing changes only between optimizer
steps, so DDP ranks agree.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable, ClassVar, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.checks import check_bool, check_fraction
from lit_efficient.core.clock import StepWatch
from lit_efficient.core.distributed import local_bytes, on_every_rank, refuse_sharded_strategies, shards_parameters
from lit_efficient.core.figures import epoch_figure_due, figure_writer, line_chart, log_figure
from lit_efficient.core.lightning_internals import before_late_restore, ensure_find_unused_parameters, is_compiled
from lit_efficient.core.logs import Throughput, step_logs_due
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.targets import validate_patterns
from lit_efficient.core.time import TrainingLength
from lit_efficient.freezing.blocks import Block, blocks_from_patterns, discover_blocks, within
from lit_efficient.freezing.cache import FrozenOutputCache, tensors_in
from lit_efficient.freezing.freezer import enter_no_grad, exit_no_grad, leaves_behind, remove_from_optimizer

TiedEmbeddings = Literal["train", "freeze"]

# The checkpoint key of every freezer: the one ProgressiveFreezing always had, so that a checkpoint
# taken with it resumes in the named callback of its schedule and back.
STATE_KEY = "ProgressiveFreezing"

#: throughput points (step, samples/s) kept for the timeline figure: the latest ones
THROUGHPUT_HISTORY = 500
# where a checkpoint keeps them: beside the callbacks' states, not in them (see on_save_checkpoint)
THROUGHPUT_KEY = "lit_efficient/freezing/throughput_history"


def check_tied_embeddings(value: str) -> str:
    if value not in ("train", "freeze"):
        raise ValueError(f"`tied_embeddings` must be 'train' or 'freeze'; got {value!r}")
    return value


def check_cache_frozen_mb(value: float, frozen_eval: bool) -> float:
    megabytes = check_fraction(value, "cache_frozen_mb", 0.0, math.inf)
    if megabytes and not frozen_eval:
        raise ValueError("`cache_frozen_mb` needs frozen_eval=True: frozen blocks in train mode (dropout) "
                         "do not return the same output twice")
    return megabytes


class BlockFreezing(EfficientCallback):
    """Base of the freezing callbacks: freezes the model's blocks front to back, as many as
    :meth:`frozen_at` says after each optimizer step (never fewer than before). See the module
    docstring; not meant to be used alone.

    Args:
        blocks: the blocks in forward order as module-name globs (or parameter names). Default
            ``None``: discovered for timm, diffusers and Hugging Face models, else the model's first
            Sequential/ModuleList stack (see :func:`~lit_efficient.freezing.blocks.discover_blocks`).
            They must form an autograd prefix, which is checked on the first training step: modules
            and parameters that run before the first block (embeddings, a stem) join block 0,
            announced once; a module of no block that runs between the first and the last block is
            refused.
        frozen_eval: put frozen blocks in eval mode, so BatchNorm statistics and dropout stop.
            Default ``True``.
        tied_embeddings: a frozen embedding tied to a trainable output head (GPT-2): ``"train"`` keeps
            the shared matrix training through the head only; ``"freeze"`` freezes it, head included.
            Default ``"train"``.
        cache_frozen_mb: keep the frozen blocks' output for every input row seen, in up to this many
            MiB (``>= 0``), and serve it instead of running them again; only unseen rows run. Default
            ``0.0``: off. Pays when the same inputs return every epoch (no random augmentation);
            otherwise nothing hits, and after two such epochs the cache frees its rows and stops, with
            a warning. Needs ``frozen_eval``; not under ``torch.compile``; a model returning
            intermediate hidden states gets the skipped blocks' inputs there. See
            :mod:`lit_efficient.freezing.cache`.
        progress_bar: show ``frozen/<blocks>=<n>`` in the progress bar (default True).

    On global rank 0 with a TensorBoardLogger (and matplotlib), the figure
    ``efficient/freezing/timeline`` shows when each block was planned to freeze and when it did,
    above the measured throughput; it is drawn on the steps a block freezes and at the end of each
    training epoch (of about 16 spread over a longer run: :func:`~lit_efficient.core.figures.epoch_figure_due`),
    never on an ordinary step.
    """

    technique = "freezing"
    needs_run_length: ClassVar[bool] = True  # the schedule reads fractions of the run
    #: whether :meth:`frozen_at` is a plan fixed by the run length (FreezeOut, the linear ramp), so the
    #: timeline can show it; an adaptive rule (AutoFreeze) decides as it goes and shows the actual steps only
    plans_ahead: ClassVar[bool] = True

    def __init__(
        self,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        cache_frozen_mb: float = 0.0,
        progress_bar: bool = True,
    ) -> None:
        self.tied_embeddings = check_tied_embeddings(tied_embeddings)
        self.block_patterns = validate_patterns(blocks, "blocks") or None
        self.frozen_eval = check_bool(frozen_eval, "frozen_eval")
        self.cache_frozen_mb = check_cache_frozen_mb(cache_frozen_mb, self.frozen_eval)
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        self._cache: Optional[FrozenOutputCache] = None
        self._served_before = self._idle_epochs = 0
        self._epoch_mark: tuple[int, int] = (-1, -1)

        self.blocks: list[Block] = []
        self.frozen = 0  # blocks 0..frozen-1 are frozen
        self.frozen_param_steps = 0.0  # sum over steps of the frozen fraction of parameters
        self._sharded = False  # FSDP2: parameters are shards
        self._optimizer_params: dict[str, torch.nn.Parameter] = {}  # under FSDP2, by name, from on_fit_start
        self.freed_state_bytes = 0  # optimizer state of the frozen parameters, on this rank, when freed
        self.counted_steps = 0
        self.throughput = Throughput()  # samples/s over windows of steps, this process only (not state)
        # for the timeline figure, both in checkpoints: the optimizer step each frozen block froze at
        # (None: before a checkpoint that did not record it), and the latest (step, samples/s) of the windows
        self.freeze_positions: list[Optional[int]] = []
        self.throughput_history: collections.deque[tuple[int, float]] = collections.deque(maxlen=THROUGHPUT_HISTORY)
        self._drawn_at = -1
        self._reading_plan = False  # planned_freeze_positions evaluates the plan at run positions
        self._total_params = 0
        self._tied: set[int] = set()
        self._hooks: list = []
        self._frozen_units: list = []  # FSDP2 units inside frozen blocks: resharded after each backward
        self._probe: Optional[list] = None
        self._order: list[str] = []
        self._watched: list[str] = []
        self._upstream: Optional[list[torch.Tensor]] = None  # the first block's inputs on the first forward
        self._joined_modules: list[str] = []  # what the probe added to block 0 (state: re-joined on resume)
        self._joined_params: list[str] = []
        self._restored_join: tuple[list[str], list[str]] = ([], [])
        self._restored_early = False  # FSDP2: the checkpoint's state went in before the optimizer's
        self._undo_late_restore: Optional[Callable[[], None]] = None  # from on_fit_start to teardown
        self._length: Optional[TrainingLength] = None
        self._steps = StepWatch()
        self._fraction, self._fraction_for = 0.0, -1

    @property
    @override
    def state_key(self) -> str:
        return STATE_KEY

    # -- set-up -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, type(self).__name__, "blocks could not be frozen whole", fsdp2=True)
        self._sharded = shards_parameters(trainer)
        if ensure_find_unused_parameters(trainer.strategy):  # frozen parameters get no gradient: DDP must not wait
            rank_zero_info(f"{type(self).__name__}: DDP set to find_unused_parameters=True "
                           "(frozen blocks get no gradients)")
        patterns = self.block_patterns
        self.blocks = blocks_from_patterns(pl_module, patterns) if patterns else discover_blocks(pl_module)
        self._joined_modules, self._joined_params = [], []
        self._total_params = sum(p.numel() for p in pl_module.parameters())
        self._fraction_for = -1
        self._tied = self._tied_params(pl_module) if self.tied_embeddings == "train" else set()
        self._start_probe(pl_module)
        if self.cache_frozen_mb:
            if is_compiled(pl_module):
                raise ValueError("`cache_frozen_mb`: frozen outputs cannot be cached in a torch.compile'd module")
            agree = on_every_rank(trainer) if self._sharded else None
            self._cache = FrozenOutputCache(int(self.cache_frozen_mb * 2**20), agree)
        super().setup(trainer, pl_module, stage)

    def _tied_params(self, pl_module: "pl.LightningModule") -> set[int]:
        """Block parameters also reachable under a name outside every block (GPT-2's tied head)."""
        members = [n for b in self.blocks for n, _ in b.modules]
        own = {n for b in self.blocks for n, _ in b.params}
        in_blocks = {id(p) for b in self.blocks for _, p in b.params}
        tied = set()
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            inside = name in own or within(name, members)
            if id(p) in in_blocks and not inside:
                tied.add(id(p))
        return tied

    def _start_probe(self, pl_module: "pl.LightningModule") -> None:
        """Record the order in which blocks and the other parameterised modules first run in training
        (grad enabled: not the sanity check), and what the first block receives, to check on the first
        training step that the blocks form an autograd prefix."""
        members = [n for b in self.blocks for n, _ in b.modules]
        main = {n for b in self.blocks for n, _ in b.modules[b.stem :]}
        in_blocks = {id(p) for b in self.blocks for _, p in b.params}
        watched = list(members)
        for name, module in pl_module.named_modules():
            inside = within(name, members)
            ancestor = any(m.startswith(name + ".") for m in members) or not name  # runs around the blocks
            own = [p for p in module.parameters(recurse=False) if id(p) not in in_blocks]
            if own and not inside and not ancestor:
                watched.append(name)
        self._order, self._probe, self._watched, self._upstream = [], [], watched, None

        def record(name, mod, args, kwargs):
            if torch.is_grad_enabled() and name not in self._order:
                self._order.append(name)
                if name in main and self._upstream is None and not torch.compiler.is_compiling():
                    self._upstream = [t for t in tensors_in((args, kwargs)) if t.requires_grad]

        for name in watched:
            module = pl_module.get_submodule(name)
            self._probe.append(module.register_forward_pre_hook(functools.partial(record, name), with_kwargs=True))

    def _check_prefix(self, pl_module: "pl.LightningModule") -> None:
        """What ran before the first block joins block 0; a module of no block between the first and
        the last block is refused (its gradient would need the backward through the frozen blocks)."""
        for handle in self._probe or []:
            handle.remove()
        # not captured under torch.compile; under FSDP2 autograd's leaves are the gathered copies of the
        # parameters, not the module's sharded ones, so everything that ran before the first block joins it
        captured, upstream = self._upstream is not None and not self._sharded, self._upstream or []
        self._probe, self._upstream = None, None
        members = [n for b in self.blocks for n, _ in b.modules]
        main = [n for b in self.blocks for n, _ in b.modules[b.stem :]]
        ran = [i for i, n in enumerate(self._order) if within(n, members)]
        if not ran:
            return
        first = next((i for i, n in enumerate(self._order) if within(n, main)), max(ran))
        for name in self._order[first : max(ran)]:
            if not within(name, members):
                raise ValueError(
                    f"`blocks` must form an autograd prefix: {name!r} runs after the first block "
                    f"({self.blocks[0].name!r}) and before the last ({self.blocks[-1].name!r}) but belongs to no "
                    "block, so its gradient would still need the backward through the frozen blocks after it. "
                    "Add it to a block or stop the blocks before it"
                )
        if self.frozen:
            return  # resumed with block 0 frozen: it stays as it was when the checkpoint was taken
        read = leaves_behind(upstream)
        modules = self._outermost([n for n in self._order[:first] if not within(n, members)], members)
        if captured:  # only what feeds the first block: a branch that reaches the head alone keeps training
            modules = [n for n in modules if any(id(p) in read for p in pl_module.get_submodule(n).parameters())]
        taken = {id(p) for b in self.blocks for _, p in b.params}
        taken |= {id(p) for n in modules for p in pl_module.get_submodule(n).parameters()}
        params = [n for n, p in pl_module.named_parameters() if id(p) in read and id(p) not in taken]
        if modules or params:
            self._join_first_block(pl_module, modules, params)
            rank_zero_info(f"{type(self).__name__}: {', '.join(map(repr, modules + params))} run before the first "
                           f"block and join block 0 ({self.blocks[0].name!r})")

    def _outermost(self, names: list[str], members: list[str]) -> list[str]:
        """``names`` (parameterised modules, in run order), each replaced by the outermost module
        whose parameterised parts all ran among them (``embed`` for ``embed.0``, ``embed.1``) and
        that holds no block."""
        result: list[str] = []
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                outer = ".".join(parts[:i])
                holds_block = any(within(m, [outer]) for m in members)
                if not holds_block and all(w in names for w in self._watched if within(w, [outer])):
                    name = outer
                    break
            if name not in result:
                result.append(name)
        return result

    def _join_first_block(self, pl_module: "pl.LightningModule", modules: list[str], params: list[str]) -> None:
        """Add ``modules`` to block 0's stem (they ran before its stack: frozen with it, never cached)
        and their and ``params``' parameters to block 0, once each."""
        first = self.blocks[0]
        found = []
        for name in modules:
            try:
                found.append((name, pl_module.get_submodule(name)))
            except AttributeError:
                raise ValueError(f"`blocks`: block 0 held {name!r} when the checkpoint was taken; this model has "
                                 "no such module") from None
        # by name as the optimizer holds them: inside a step, FSDP2 may have its gathered copies registered
        named = self._optimizer_params or dict(pl_module.named_parameters())
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"`blocks`: block 0 held {missing} when the checkpoint was taken; this model has no "
                             "such parameters")
        taken = {id(p) for b in self.blocks for _, p in b.params}
        candidates = [(f"{n}.{k}", named.get(f"{n}.{k}", p)) for n, m in found for k, p in m.named_parameters()]
        candidates += [(n, named[n]) for n in params]
        new = []
        for name, p in candidates:
            if id(p) not in taken:
                taken.add(id(p))
                new.append((name, p))
        first.modules[first.stem : first.stem] = found
        first.stem += len(found)
        first.params[:0] = new
        self._joined_modules += modules
        self._joined_params += params
        self._tied = self._tied_params(pl_module) if self.tied_embeddings == "train" else set()
        self._fraction_for = -1

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._length = TrainingLength.from_trainer(trainer)
        self._resolve_times(self._length)
        if self.needs_run_length and self._length.total_steps is None:
            raise ValueError(f"{self._schedule_name()} needs a known run length (max_steps or max_epochs)")

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for block in self.blocks:  # the module's parameters as the optimizer holds them (FSDP2 replaced them)
            block.rebind(pl_module)
        self._optimizer_params = dict(pl_module.named_parameters()) if self._sharded else {}
        self._tied = self._tied_params(pl_module) if self.tied_embeddings == "train" else set()
        # a restored frozen set is applied here: after the optimizer exists, before its state is loaded
        self._apply_restored(trainer, pl_module)
        # FSDP2 (ModelParallelStrategy) restores only after this hook, and loads the optimizer strictly
        # before this callback's state: the checkpoint's frozen set goes in first (frozen parameters
        # left the optimizer, so their state is missing from the checkpoint)
        self._undo_late_restore = before_late_restore(
            trainer, self.state_key, functools.partial(self._restore_before_optimizer, trainer, pl_module))

    def _apply_restored(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", in_place: int = 0) -> None:
        """Freeze the restored frozen set (``self.frozen`` from ``load_state_dict``) as freezing does in
        training, after the ``in_place`` blocks frozen already; block 0 first gets back what the probe
        joined to it, so that it freezes whole."""
        (modules, params), self._restored_join = self._restored_join, ([], [])
        if modules or params:
            self._join_first_block(pl_module, modules, params)
        restored, self.frozen = self.frozen, in_place
        self.freeze_to(restored, trainer, pl_module)

    def _restore_before_optimizer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                  state: dict[str, Any]) -> None:
        """A checkpoint's state applied before the strategy loads the optimizer (FSDP2); Lightning's
        ``load_state_dict`` of it that follows changes nothing."""
        in_place = self.frozen  # 0, unless this callback froze blocks in an earlier fit (on_fit_start froze them)
        self.load_state_dict(state)
        self._apply_restored(trainer, pl_module, in_place)
        self._restored_early = True

    # -- the schedule: what a subclass says -----------------------------------------------------
    def frozen_at(self, step: int) -> int:
        """How many blocks the rule freezes after optimizer step ``step`` (clipped to the blocks,
        and never fewer than are frozen already, by :meth:`scheduled_count`)."""
        raise NotImplementedError(f"{type(self).__name__} must say how many blocks are frozen at a step (frozen_at)")

    def _resolve_times(self, length: TrainingLength) -> None:
        """Turn the rule's time specs into optimizer steps, at the start of training (override)."""

    def _schedule_name(self) -> str:
        """What the errors about the schedule call it."""
        return type(self).__name__

    def run_fraction(self, step: int) -> float:
        """Optimizer step ``step`` as a fraction of the run (0 when the length is unknown)."""
        total = self._length.total_steps if self._length else None
        return self.position(step) / total if total else 0.0

    def scheduled_count(self, step: int) -> int:
        """Blocks that should be frozen after optimizer step ``step`` (never fewer than now)."""
        return max(self.frozen, min(self.frozen_at(step), len(self.blocks)))

    # -- every step ---------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx) -> None:
        if not self.throughput.is_open:  # a window opens at a training batch: validation, the epoch's
            self.throughput.start(pl_module.device)  # boundary and the figures' drawing stay outside
        if self.frozen_eval:
            for block in self.blocks[: self.frozen]:
                for _, module in block.modules:
                    if module.training:
                        module.eval()  # Lightning puts the whole model back in train mode each epoch
        if self._cache is not None:
            self._cache.active = True

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._cache is not None:
            self._epoch_mark = (self.frozen, self._cache.row_hits)

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close_window(trainer, pl_module, restart=False)  # validation is not training throughput

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._close_window(trainer, pl_module, restart=False)  # the next opens at the next epoch's first batch
        if epoch_figure_due(trainer):
            self.draw_timeline(trainer, pl_module)
        cache = self._cache
        if cache is None or cache.disabled is not None or not self.frozen:
            return
        # a whole epoch on one frozen prefix, and not one training row came back: nothing repeats
        idle = self._epoch_mark == (self.frozen, cache.row_hits)
        self._idle_epochs = self._idle_epochs + 1 if idle else 0
        if self._idle_epochs >= 2:
            cache.disable("no input to the frozen blocks came back in two epochs (random augmentation, dropout "
                          "before them, or an embedding still training through a tied head?)", for_good=True)

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx,
                                  dataloader_idx: int = 0) -> None:
        if self._cache is not None and self.frozen:  # validation inputs repeat too (frozen blocks: eval either way)
            self._cache.active = True

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self._cache is not None:
            self._cache.active = False

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss) -> None:
        if self._probe is not None:
            self._check_prefix(pl_module)

    @override
    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # FSDP2's backward prefetches the unit before the first trainable one, a frozen one whose own
        # backward never comes to reshard it: without this, frozen weights stay gathered on every rank
        for unit in self._frozen_units:
            unit.reshard()

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx) -> None:
        self.throughput.add(_batch_size(batch))
        if self._cache is not None:
            self._cache.active = False
        if not self._steps.stepped(trainer):
            return  # no optimizer step since the last call (gradient accumulation)
        step = trainer.global_step
        self.frozen_param_steps += self.frozen_fraction()
        self.counted_steps += 1
        before = self.frozen
        self.freeze_to(self.scheduled_count(step), trainer, pl_module)
        self.show_progress(pl_module, f"frozen/{len(self.blocks)}", self.frozen)
        metrics: dict[str, Any] = {"frozen_fraction": self.frozen_fraction(), "frozen_blocks": float(self.frozen)}
        if step_logs_due(trainer):  # the clock is read (after a device sync) only on the steps Lightning logs
            rate = self._close_window(trainer, pl_module)
            if rate is not None:
                metrics["samples_per_second"] = rate
        if self.frozen > before:
            self.freeze_positions += [self.position(step)] * (self.frozen - before)
            self.draw_timeline(trainer, pl_module)
        if self._cache is not None:
            metrics["cache_served"] = float(self._cache.served > self._served_before)  # whole prefix, this step
            metrics["cache_megabytes"] = self._cache.nbytes / 2**20
            self._served_before = self._cache.served
        self.log_metrics(pl_module, metrics)

    def _close_window(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                      restart: bool = True) -> Optional[float]:
        """Close the throughput window (a device sync: only where the run syncs anyway) and keep its
        rate for the timeline figure."""
        rate = self.throughput.close(pl_module.device, restart=restart)
        if rate is not None:
            self.throughput_history.append((self.position(trainer.global_step), rate))
        return rate

    # -- freezing -----------------------------------------------------------------------------
    def freeze_to(self, count: int, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Freeze blocks ``self.frozen .. count-1``."""
        if count <= self.frozen:
            return
        newly = self.blocks[self.frozen : count]
        params = [p for b in newly for _, p in b.params if id(p) not in self._tied]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for optimizer in trainer.optimizers:
            self.freed_state_bytes += sum(local_bytes(v) for p in params for v in optimizer.state.get(p, {}).values()
                                          if isinstance(v, torch.Tensor) and v.dim())
            remove_from_optimizer(optimizer, params)
        if self._sharded:
            from torch.distributed.fsdp import FSDPModule

            self._frozen_units += [unit for block in newly for _, module in block.modules for unit in module.modules()
                                   if isinstance(unit, FSDPModule)]
        for block in newly:
            for _, module in block.modules:
                self._hooks.append(module.register_forward_pre_hook(enter_no_grad))
                self._hooks.append(module.register_forward_hook(exit_no_grad, always_call=True))
                if self.frozen_eval:
                    module.eval()
        if self._cache is not None:
            self._cache.extend([module for block in newly for _, module in block.modules[block.stem :]])
        self.frozen = count
        rank_zero_info(f"{type(self).__name__}: {count}/{len(self.blocks)} blocks frozen (up to {newly[-1].name}) "
                       f"at step {trainer.global_step}")

    def frozen_fraction(self) -> float:
        """Fraction of the module's parameters frozen now (cached: it changes only in ``freeze_to``)."""
        if self._fraction_for != self.frozen:
            frozen = sum(p.numel() for b in self.blocks[: self.frozen] for _, p in b.params if id(p) not in self._tied)
            self._fraction = frozen / self._total_params if self._total_params else 0.0
            self._fraction_for = self.frozen
        return self._fraction

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for handle in self._hooks + (self._probe or []):
            handle.remove()
        self._hooks, self._probe, self._frozen_units = [], None, []
        if self._undo_late_restore is not None:
            self._undo_late_restore()
            self._undo_late_restore = None
        if self._cache is not None:
            self._cache.remove()
            self._cache = None

    # -- reporting ----------------------------------------------------------------------------
    def planned_freeze_positions(self) -> Optional[list[Optional[int]]]:
        """The run position (:meth:`position`, full-data optimizer steps) at which the plan freezes each
        block (None: never in this run), from :meth:`frozen_at` over the known run length; None without
        a plan (adaptive rules, or an unknown run length). Positions, not optimizer steps: under InfoBatch
        the steps a future position falls on are not known yet."""
        total = self._length.total_steps if self._length else None
        if not self.plans_ahead or not total:
            return None
        self._reading_plan = True
        try:
            planned: list[Optional[int]] = []
            low = 0
            for count in range(1, len(self.blocks) + 1):  # the first position whose plan has ``count`` frozen
                if min(self.frozen_at(total), len(self.blocks)) < count:
                    planned += [None] * (len(self.blocks) - len(planned))
                    break
                high = total
                while low < high:  # frozen_at never decreases along the run
                    middle = (low + high) // 2
                    if self.frozen_at(middle) >= count:
                        high = middle
                    else:
                        low = middle + 1
                planned.append(low)
            return planned
        finally:
            self._reading_plan = False

    @override
    def position(self, step: int) -> int:
        return step if self._reading_plan else super().position(step)

    def draw_timeline(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The figure ``efficient/freezing/timeline`` at this step (rank 0 with TensorBoard only; once a
        step): when each block was planned to freeze and when it did, above the throughput. The time
        spent drawing is left out of the throughput windows."""
        step = trainer.global_step
        if step == self._drawn_at or not self.blocks or figure_writer(trainer) is None:
            return
        self._drawn_at = step
        self._close_window(trainer, pl_module, restart=False)  # the window so far, with this step's point
        names = [block.name for block in self.blocks]
        planned = self.planned_freeze_positions()
        actual = list(self.freeze_positions)
        total = self._length.total_steps if self._length else None
        history = list(self.throughput_history)
        now = self.position(step)
        title = (f"{type(self).__name__}: {self.frozen}/{len(names)} blocks frozen at step {step}"
                 + (f" (run position {now})" if now != step else "")
                 + ("" if planned is not None else " (adaptive: no plan, actual freeze steps only)"))
        height = 1.2 + sum(_panel_inches(len(names)))
        log_figure(trainer, self.technique, "timeline",
                   lambda figure: _draw_timeline(figure, names, planned, actual, now, total, history, title),
                   height=height)  # the window reopens at the next training batch

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if not self.blocks:
            return []
        mean_frozen = self.frozen_param_steps / max(1, self.counted_steps)
        rows = [
            SavingsRow(self.technique, "blocks frozen at the end", f"{self.frozen}/{len(self.blocks)} "
                       f"({self.frozen_fraction():.1%} of parameters)"),
            SavingsRow(self.technique, "parameter-steps frozen (weight gradients and optimizer work skipped)",
                       f"{mean_frozen:.1%}", 1.0 - mean_frozen),
        ]
        tenths = self.throughput.first_and_last_tenth()
        if tenths is not None:
            first, last = tenths
            rows.append(SavingsRow(self.technique, "throughput, last vs first tenth of the run",
                                   f"{last:.0f} vs {first:.0f} samples/s", float(first / last),
                                   "first tenth's step time"))
        frozen = [p for b in self.blocks[: self.frozen] for _, p in b.params if id(p) not in self._tied]
        weights = sum(local_bytes(p) for p in frozen)  # the gradient each would have, same size and dtype
        if weights:
            rows.append(SavingsRow(self.technique, "memory freed on each rank (frozen blocks' gradients + optimizer "
                                   "state)", f"{weights / 2**20:.2f} + {self.freed_state_bytes / 2**20:.2f} MiB"))
        if self._cache is not None:
            cache = self._cache
            rows.append(SavingsRow(self.technique, "forwards through frozen blocks served from the cache",
                                   f"{cache.served} whole, {cache.served_in_part} in part, of {cache.forwards} "
                                   f"({cache.nbytes / 2**20:.1f} MiB cached)"))
        return rows

    # -- state --------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # one format for every freezer (AutoFreeze fills in its gradient norms): the keys
        # ProgressiveFreezing always wrote, so checkpoints move between the callbacks
        return {"frozen": self.frozen, "previous_norms": [], "pending": 0,
                "frozen_param_steps": self.frozen_param_steps, "counted_steps": self.counted_steps,
                "freed_state_bytes": self.freed_state_bytes,
                "last_step": self._steps.last, "check_deferred": False,
                "joined_modules": list(self._joined_modules),
                "joined_params": list(self._joined_params),
                "freeze_positions": list(self.freeze_positions)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = int(state_dict["frozen"])  # applied in on_fit_start, before the optimizer state loads
        self.frozen_param_steps = float(state_dict["frozen_param_steps"])
        self.freed_state_bytes = int(state_dict.get("freed_state_bytes", 0))  # older checkpoints: not counted
        self.counted_steps = int(state_dict["counted_steps"])
        # the timeline's history (older checkpoints: freeze steps unknown, no throughput points)
        steps = [None if s is None else int(s) for s in state_dict.get("freeze_positions", [])][: self.frozen]
        self.freeze_positions = steps + [None] * (self.frozen - len(steps))
        self._steps.last = int(state_dict["last_step"])
        # joined to block 0 again in on_fit_start, before the frozen set (older checkpoints: nothing joined)
        self._restored_join = ([str(n) for n in state_dict.get("joined_modules", [])],
                               [str(n) for n in state_dict.get("joined_params", [])])
        if self._restored_early:  # the same state, applied already before the optimizer loaded (FSDP2)
            self._restored_join, self._restored_early = ([], []), False

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        # measured wall-clock, so not in ``state_dict``: a resumed run's state stays equal to the
        # uninterrupted run's; the checkpoint still carries it, for the timeline of a resumed run
        checkpoint[THROUGHPUT_KEY] = [list(point) for point in self.throughput_history]

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        self.throughput_history.clear()  # older checkpoints: none
        self.throughput_history.extend((int(s), float(r)) for s, r in checkpoint.get(THROUGHPUT_KEY, []))


POSITION_LABEL = "run position (optimizer steps; full-data epochs under data pruning)"


def _panel_inches(blocks: int) -> tuple[float, float]:
    """Heights of the timeline's two panels: a row per block on top, the throughput below."""
    return max(2.6, 0.9 + 0.25 * blocks), 2.4


def _draw_timeline(figure, names: list[str], planned: Optional[list[Optional[int]]], actual: list[Optional[int]],
                   step: int, total: Optional[int], history: list[tuple[int, float]], title: str) -> None:
    """Top: one row per block, trained (blue) until it froze, frozen (grey) after, with the planned
    freeze as a black diamond. Bottom: samples/s, a dotted line at each freeze. The x axis is the run
    position (``step`` is now's), where the plan lies: optimizer steps of full-data epochs."""
    from matplotlib.ticker import MaxNLocator

    grid = figure.add_gridspec(2, 1, height_ratios=_panel_inches(len(names)))
    timeline, speed = figure.add_subplot(grid[0]), figure.add_subplot(grid[1])
    end = total or max([step, 1] + [s for s in planned or [] if s is not None])
    rows = range(len(names))
    for row in rows:
        froze = actual[row] if row < len(actual) else None
        trained_until = step if row >= len(actual) else (froze if froze is not None else 0)
        timeline.barh(row, trained_until, height=0.6, color="#4c72b0", label="training" if row == 0 else None)
        if row < len(actual):
            start = froze if froze is not None else 0
            timeline.barh(row, step - start, left=start, height=0.6, color="#999999",
                          hatch=None if froze is not None else "//",
                          label="frozen" if froze is not None else "frozen (step not recorded)")
            if froze is not None:
                timeline.plot([froze], [row], marker="o", color="#c44e52", markersize=7, linestyle="none",
                              label="actual freeze")
    if planned is not None:
        shown = [(row, s) for row, s in zip(rows, planned) if s is not None]
        if shown:
            timeline.plot([s for _, s in shown], [row for row, _ in shown], marker="D", markerfacecolor="none",
                          markeredgecolor="black", markersize=8, markeredgewidth=1.5, linestyle="none",
                          label="planned freeze")
    timeline.axvline(step, color="black", linestyle=":", linewidth=1, label="now")
    timeline.set_yticks(list(rows))
    timeline.set_yticklabels(names, fontsize=9 if len(names) <= 16 else 7 if len(names) <= 48 else 5.5)
    timeline.set_ylim(len(names) - 0.5, -0.5)  # block 0 on top
    timeline.set_xlim(0, end)
    timeline.set_xlabel(POSITION_LABEL)
    timeline.set_title(title)
    timeline.grid(axis="x", alpha=0.3)
    handles, labels = timeline.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    timeline.legend(unique.values(), unique.keys(), fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))

    line_chart(speed, {"samples/s": ([s for s, _ in history], [r for _, r in history])},
               "throughput over the windows between logging steps and freezes", POSITION_LABEL, "samples/s")
    for i, froze in enumerate(s for s in actual if s is not None):
        speed.axvline(froze, color="#c44e52", linestyle=":", linewidth=1.2, label="block froze" if i == 0 else None)
    speed.set_xlim(0, end)
    speed.set_ylim(bottom=0)
    for axes in (timeline, speed):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not history:
        speed.text(0.5, 0.5, "no throughput window closed yet", ha="center", va="center", transform=speed.transAxes)
        speed.set_yticks([])
    speed.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0
