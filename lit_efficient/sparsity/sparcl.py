"""SparCL: sparse continual learning — task-aware masks, gradient masks and data removal.

Paper: Wang et al., "SparCL: Sparse Continual Learning on the Edge", NeurIPS 2022,
https://arxiv.org/abs/2209.09476 (reference code: github.com/neu-spiral/SparCL).

SparCL wraps any rehearsal method (ER, DER++) and cuts the cost of training it in three ways,
each switchable on its own:

* **TDM** (task-aware dynamic masking). Masks start at the target sparsity by weight magnitude
  (uniform over layers). Within each task, every ``mask_update_every`` of the task's epochs, each
  layer drops its active weights with the lowest ``|w| + λ·|g|`` (``g`` the latest dense
  gradient) down to ``explore_fraction`` below the target density, then regrows as many positions
  at random among those that were inactive, at weight 0 with zero optimizer state. From
  ``mask_fixed_from`` of each task on, the mask stays fixed; the next task explores again.
* **DGM** (dynamic gradient masking). After backward, gradients of the sparse layers are masked
  by the weight mask and every entry below the ``gradient_sparsity`` quantile of ``|grad|`` over
  the tensor is zeroed (as the reference code does: a tensor already sparser than
  ``gradient_sparsity`` keeps all its active entries); the gradient mask is recomputed at each
  epoch's first step and every ``gradient_mask_every`` steps within the epoch.
* **DDR** (dynamic data removal). Every training sample of the task counts its forgetting events
  (correct → incorrect between two visits; samples never classified correctly count as the
  most forgotten, so they are removed last). At ``removal_points`` of each task
  the samples with the fewest events are removed, ``removal_fraction`` of the task's data in
  total; removed samples are never loaded again in that task (the loader follows a planned
  order, :mod:`lit_efficient.data.planned_order`).

Tasks come from the datamodule (:mod:`lit_efficient.continual`): SparCL refuses to run without
``num_tasks``/``epochs_per_task``. For data removal ``training_step`` returns, besides its loss,
``"sample_correct"``: one bool per sample of the batch (prediction == label).

SparCL is composed of two parts and nothing else: the schedule-free masked-training base
(:class:`lit_efficient.sparsity.masked.MaskedTraining`: targets and mask buffers, masks applied
after each optimizer step, dense gradients, deferred updates on overflow steps, FLOPs, state, on
the mask engine of :mod:`lit_efficient.sparsity.masks`), whose update steps SparCL names itself
(each task's exploration epochs), and the planned-order loader
(:class:`lit_efficient.data.planned_order.PlannedOrder`) for data removal. It does not build on the
periodic schedule of GraNet, RigL and SET. Every random choice is seeded and every score is
computed from DDP-averaged gradients or all-reduced records, so all ranks hold the same masks and
the same removed samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lit_efficient.core.checks import check_bool, check_fraction
from lit_efficient.core.distributed import reduced_across_ranks
from lit_efficient.core.figures import figure_writer, histogram, log_figure, stacked_bars
from lit_efficient.core.lightning_internals import is_last_batch
from lit_efficient.core.logs import log_histogram
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.seeding import epoch_generator
from lit_efficient.core.shards import Span, counts, local
from lit_efficient.core.tasks import TaskProgress, require_task_progress, task_epochs, task_of_epoch, task_time
from lit_efficient.core.time import step_interval
from lit_efficient.data.planned_order import PlannedOrder
from lit_efficient.sparsity.masked import MaskedTraining
from lit_efficient.sparsity.masks import drop_and_grow, keep_counts, topk_mask, uniform_densities

CORRECT_CONTRACT = ('`training_step` must return "sample_correct": a 1-D bool tensor, one entry per sample of the '
                    'batch (prediction == label), e.g. {"loss": loss, "sample_correct": logits.argmax(1) == y}')


# -- pure functions ---------------------------------------------------------------------------------

def tdm_scores(weight: Tensor, grad: Optional[Tensor], score_lambda: float) -> Tensor:
    """SparCL's importance of each weight: ``|w| + λ·|g|``."""
    score = weight.detach().abs().float()
    if grad is not None:
        score = score + score_lambda * grad.detach().abs().float()
    return score


def tdm_update(weight: Tensor, mask: Tensor, grad: Optional[Tensor], explore: int, generator: torch.Generator,
               score_lambda: float = 0.5, span: Optional[Span] = None, active: Optional[int] = None) -> Tensor:
    """One expand-and-explore step of a layer: drop the ``explore`` active weights of lowest
    ``|w| + λ|g|``, regrow ``explore`` positions drawn at random among the inactive ones. The
    tensors may be a rank's part of the layer (``span``, with the layer's ``active`` count)."""
    shape = span.shape if span is not None else mask.shape
    random_scores = torch.rand(shape, generator=generator)  # drawn whole on every rank alike
    random_scores = (span.take(random_scores) if span is not None else random_scores).to(mask.device)
    return drop_and_grow(weight, mask, explore, random_scores, drop_scores=tdm_scores(weight, grad, score_lambda),
                         regrow_dropped=False, span=span, active=active)


def gradient_mask(grad: Tensor, weight_mask: Tensor, gradient_sparsity: float, span: Optional[Span] = None,
                  active: Optional[int] = None) -> Tensor:
    """Keep the entries of the weight-masked gradient at or above its ``gradient_sparsity`` quantile
    of ``|grad|`` over the whole tensor: the ``(1 − gradient_sparsity)·numel`` largest, never more
    than the active ones. At weight sparsity ≥ ``gradient_sparsity`` this is the weight mask. The
    tensors may be a rank's part of the layer (``span``, with the layer's ``active`` count)."""
    whole = span.whole if span is not None else grad.numel()
    active = int(weight_mask.sum()) if active is None else active
    keep = min(int(round((1.0 - gradient_sparsity) * whole)), active)
    scores = torch.where(weight_mask, grad.detach().abs().float(), torch.full_like(grad, -1.0, dtype=torch.float32))
    return topk_mask(scores, keep, span) & weight_mask


def update_forgetting(prev_correct: Tensor, events: Tensor, learned: Tensor, visit: Tensor) -> None:
    """Fold one epoch of visits into the forgetting records, in place.

    ``visit`` holds 1 (correct), 0 (incorrect) or -1 (not visited) per sample; a forgetting event
    is a visit that is incorrect after the previous visit was correct.
    """
    seen = visit >= 0
    events += (seen & (prev_correct == 1) & (visit == 0)).long()
    learned |= visit == 1
    prev_correct[seen] = visit[seen].to(prev_correct.dtype)


def removal_choice(events: Tensor, learned: Tensor, removed: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """The ``count`` samples still present with the fewest forgetting events (ties at random;
    never-learned samples last): a bool mask of the newly removed."""
    present = ~removed
    count = max(0, min(count, int(present.sum())))
    key = events.double() + 0.5 * torch.rand(events.shape, generator=generator, dtype=torch.float64)
    key = torch.where(learned, key, torch.full_like(key, float(events.max()) + 1.0 if events.numel() else 1.0))
    key = torch.where(present, key, torch.full_like(key, float("inf")))
    return topk_mask(-key, count) & present


class SparCL(PlannedOrder, MaskedTraining):
    """Sparse continual learning (SparCL, NeurIPS 2022): TDM + DGM + DDR on any rehearsal method.

    Args:
        sparsity: fraction of the targeted weights that are zero, in [0, 1) (default 0.9).
        tdm: task-aware dynamic masks (default True); False keeps the initial magnitude masks.
        dgm: dynamic gradient masks (default True).
        ddr: dynamic data removal (default True); needs ``"sample_correct"`` from ``training_step``.
        gradient_sparsity: fraction of each sparse layer's gradient entries that are zero after
            DGM (the weight mask's zeros count), in [0, 1) (default 0.8).
        removal_fraction: fraction of each task's training samples removed by DDR, in [0, 1)
            (default 0.3).
        mask_update_every: TDM period within each task: a fraction of the task in (0, 1] or epochs
            (``"5ep"``) (default 0.1: 5 of 50 epochs).
        mask_fixed_from: when in each task the masks stay fixed: a fraction of the task in (0, 1] or
            epochs (``"45ep"``) (default 0.9: epoch 45 of 50).
        score_lambda: λ of the TDM score ``|w| + λ|g|``, ≥ 0 (default 0.5).
        explore_fraction: how far below the target density each TDM update prunes before
            regrowing, as a fraction of the layer, in [0, 1) (default 0.01).
        gradient_mask_every: optimizer steps between DGM mask refreshes within an epoch: an int ≥ 1
            or steps (``"30st"``) (default 30; each epoch starts with a fresh one).
        removal_points: the points of each task at whose end DDR removes samples, each a fraction
            of the task in (0, 1) or epochs (``"5ep"``) (default ``[0.1, 0.2, 0.3, 0.4]``: epochs 5,
            10, 15, 20 of 50); each removes an equal share of ``removal_fraction``.
        include, exclude: module-name patterns of the layers to sparsify (see :mod:`lit_efficient.core.targets`).
        seed: seed of every random choice (identical on all ranks).
        progress_bar: show ``sparsity=<fraction>`` and, with data removal, ``removed%=<percent>`` of
            the task's samples in the progress bar (default True).

    Logged under ``efficient/sparcl/``: ``sparsity``, per-layer densities and figures (see
    :class:`~lit_efficient.sparsity.masked.MaskedTraining`) at
    each TDM update, ``gradient_sparsity`` at each DGM refresh, ``task``, ``removed_fraction``
    and ``forgetting_events_mean`` each epoch; rows in the savings table for weight sparsity,
    gradient sparsity, samples removed and training FLOPs relative to dense training on all data.
    """

    technique = "sparcl"
    growth = "random"  # TDM regrows at random: no step reads a dense weight gradient for growth

    def __init__(
        self,
        sparsity: float = 0.9,
        tdm: bool = True,
        dgm: bool = True,
        ddr: bool = True,
        gradient_sparsity: float = 0.8,
        removal_fraction: float = 0.3,
        mask_update_every: float = 0.1,
        mask_fixed_from: float = 0.9,
        score_lambda: float = 0.5,
        explore_fraction: float = 0.01,
        gradient_mask_every: int = 30,
        removal_points: Sequence[float] = (0.1, 0.2, 0.3, 0.4),
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        super().__init__(sparsity, include, exclude, seed, progress_bar)
        self.tdm, self.dgm, self.ddr = check_bool(tdm, "tdm"), check_bool(dgm, "dgm"), check_bool(ddr, "ddr")
        self.gradient_sparsity = check_fraction(gradient_sparsity, "gradient_sparsity")
        self.removal_fraction = check_fraction(removal_fraction, "removal_fraction")
        # times within each task: fractions of it (the paper's) or epochs ("5ep"); read back as given
        self.mask_update_every, self.mask_fixed_from = mask_update_every, mask_fixed_from
        self._update_every = task_time(mask_update_every, "mask_update_every")
        self._fixed_from = task_time(mask_fixed_from, "mask_fixed_from")
        if isinstance(score_lambda, bool) or not isinstance(score_lambda, (int, float)) or not score_lambda >= 0:
            raise ValueError(f"`score_lambda` must be a number >= 0; got {score_lambda!r}")
        self.score_lambda = float(score_lambda)
        self.explore_fraction = check_fraction(explore_fraction, "explore_fraction")
        self.gradient_mask_every = step_interval(gradient_mask_every, "gradient_mask_every")
        if isinstance(removal_points, (str, bytes)) or not removal_points:
            raise ValueError("`removal_points` must be a non-empty list of fractions of a task; "
                             f"got {removal_points!r}")
        self._removal_points = [task_time(p, "removal_points", below_one=True) for p in removal_points]
        self.removal_points = list(removal_points)
        self.shuffle: Optional[bool] = None
        self.init_planned_order()
        # task and data-removal records (of the current task's training set)
        self.task = -1
        self.num_samples = 0
        self.events = torch.zeros(0, dtype=torch.long)
        self.learned = torch.zeros(0, dtype=torch.bool)
        self.prev_correct = torch.zeros(0, dtype=torch.int8)
        self.visit = torch.zeros(0, dtype=torch.int8)
        self.removed = torch.zeros(0, dtype=torch.bool)
        self.opened_epoch = -1  # the last epoch whose start was processed
        self.removed_total = 0  # over all tasks
        self.samples_total = 0
        self.removal_history: list[tuple[int, int, float]] = []  # (epoch, task, removed fraction) per closed epoch
        # gradient masks and the step accounting of FLOPs
        self.grad_masks: list[Tensor] = []
        self._grad_nonzeros: list[int] = []  # per gradient mask, counted once per refresh
        self.grad_mask_step = -1
        self.grad_mask_epoch = -1
        self.full_steps = 0
        self.grad_density_steps = 0.0
        self._update_due = False
        self._progress: Optional[TaskProgress] = None
        self._batch_indices: Optional[Tensor] = None

    # -- set-up -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        super().setup(trainer, pl_module, stage)  # strategy check, targets, composition check
        require_task_progress(trainer, "SparCL")
        if self.ddr:
            self.follow_planned_order(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            self.stop_following()

    @override
    def plans_sample_order(self) -> bool:
        return self.ddr

    @override
    def initial_masks(self) -> list[Tensor]:
        """Uniform density, the largest-magnitude weights of each layer (SparCL's start)."""
        assert self.masks is not None
        shapes = self.masks.shapes
        keep = keep_counts(shapes, uniform_densities(shapes, 1.0 - self.sparsity))
        return [topk_mask(w.detach().abs(), k, span) for w, k, span in zip(self.masks.weights, keep, self.masks.spans)]

    # -- the task schedule ----------------------------------------------------------------------
    def is_tdm_epoch(self, progress: TaskProgress) -> bool:
        """Whether the masks change at the end of this epoch (an exploration epoch of the task)."""
        done = progress.epoch_in_task + 1
        every = task_epochs(self._update_every, progress.epochs_per_task)
        return (self.tdm and self.sparsity > 0 and done % every == 0
                and done < task_epochs(self._fixed_from, progress.epochs_per_task))

    def removal_count(self, progress: TaskProgress) -> int:
        """Samples DDR removes at the end of this epoch of the task (0 if not a removal point)."""
        done = progress.epoch_in_task + 1
        points = sorted(task_epochs(p, progress.epochs_per_task) for p in self._removal_points)
        total = int(round(self.removal_fraction * self.num_samples))
        count = 0
        for i, point in enumerate(points):
            if point == done:
                count += round(total * (i + 1) / len(points)) - round(total * i / len(points))
        return count

    @override
    def is_update_step(self, step: int) -> bool:
        return self._update_due

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.open_epoch(trainer, pl_module)

    def open_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Count this epoch's full-data steps, once (Lightning skips on_train_epoch_start when it resumes
        inside an epoch, whose count came with the checkpoint, and after a checkpoint on an epoch's last batch)."""
        self._progress = require_task_progress(trainer, "SparCL")
        if self.opened_epoch == trainer.current_epoch:
            return
        self.opened_epoch = trainer.current_epoch
        if self.update_deferred and self._progress.is_first_epoch:
            self.update_deferred = False  # a mask update put off by an overflow step: the task it was for ended
        # optimizer steps of this epoch on all of the task's data: what dense training would take
        if self.ddr:
            self.full_steps += self.optimizer_steps(self.num_samples, trainer)
        else:
            self.full_steps += math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        self.log_metrics(pl_module, {"task": float(self._progress.task)}, on_step=False, on_epoch=True)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self.open_epoch(trainer, pl_module)
        progress = self._progress
        last = is_last_batch(trainer)
        self._update_due = bool(last) and self.is_tdm_epoch(progress)
        if self.ddr:
            self._batch_indices = self.start_batch()

    # -- gradients ------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # keeps |g| for TDM on update steps
        if not self.dgm or self.masks is None:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        # refreshed at each epoch's first step (so a new task never trains through the last task's
        # gradient mask) and every `gradient_mask_every` steps within the epoch, as the reference does
        due = step - self.grad_mask_step >= self.gradient_mask_every
        if not self.grad_masks or epoch != self.grad_mask_epoch or due:
            if not self.gradients_finite(optimizer, "the gradient mask refresh", step + 1):
                return  # an overflow step (skipped by the GradScaler): the refresh is still due on the next one
            masks = self.masks
            self.grad_masks = [
                gradient_mask(local(p.grad), m, self.gradient_sparsity, span, active) if p.grad is not None
                else m.clone()
                for p, m, span, active in zip(masks.params, masks.masks, masks.spans, masks.nonzeros())
            ]
            self.grad_mask_step, self.grad_mask_epoch = step, epoch
            self._grad_nonzeros = counts(self.grad_masks, masks.group)
            self.log_metrics(pl_module, {"gradient_sparsity": 1.0 - sum(self._grad_nonzeros) / sum(self.masks.sizes())})
        with torch.no_grad():
            for i, (p, m) in enumerate(zip(self.masks.params, self.masks.masks)):
                if p.grad is None:
                    continue
                grad = local(p.grad)  # FSDP2: this rank's rows, as the masks
                if self.grad_masks[i].device != grad.device:  # restored from a checkpoint on the CPU
                    self.grad_masks[i] = self.grad_masks[i].to(grad.device)
                grad.mul_(self.grad_masks[i] & m)  # a mask update since the refresh may have closed positions

    @override
    def account_step(self, dense_gradient: bool = False) -> None:
        """This step's training FLOPs of the targeted layers relative to dense: forward and input
        gradient at the weight density, weight gradient at the gradient-mask density."""
        assert self.masks is not None
        densities = self.masks.layer_densities()
        forward = self.flops.ratio(densities) if self.flops is not None else self.masks.density()
        if self.dgm and self.grad_masks:
            grad_densities = [n / size for n, size in zip(self._grad_nonzeros, self.masks.sizes())]
            weight_grad = (self.flops.ratio(grad_densities) if self.flops is not None
                           else sum(grad_densities) / len(grad_densities))
        else:
            weight_grad = forward
        self.grad_density_steps += weight_grad
        self.density_steps += (2 * forward + weight_grad) / 3
        self.counted_steps += 1

    # -- TDM ------------------------------------------------------------------------------------
    @override
    def update(self, step: int, optimizer, grad_scores: Optional[list[Tensor]]) -> dict[str, float]:
        assert self.masks is not None
        masks = self.masks
        grads = grad_scores if grad_scores is not None else [None] * len(masks.params)
        new_masks = [
            m if frozen else tdm_update(w, m, g, int(round(self.explore_fraction * size)), self.generator,
                                        self.score_lambda, span, active)
            for w, m, g, frozen, span, active, size in zip(masks.weights, masks.masks, grads, self.frozen_layers(),
                                                           masks.spans, masks.nonzeros(), masks.sizes())
        ]
        regrown = sum(masks.set_masks(new_masks, optimizer))
        return {"regrown": float(regrown), "density": masks.density()}

    # -- DDR ------------------------------------------------------------------------------------
    @override
    def dataset_ready(self, size: int, trainer: "pl.Trainer") -> None:
        progress = require_task_progress(trainer, "SparCL")
        if progress.task < self.task or trainer.current_epoch < self.plan_epoch:
            # Lightning looks at the data (estimated_stepping_batches) before it restores a checkpoint's
            # epoch; the loader is rebuilt for the right epoch right after, so leave the records and the
            # plan (with its position, for a resume inside the epoch) alone
            return
        if progress.task > self.task:
            self.start_task(progress.task, size)
        elif size != self.num_samples:
            raise ValueError(f"SparCL's records hold {self.num_samples} samples of task {self.task} but its "
                             f"training dataset has {size}")
        if self.plan_epoch != trainer.current_epoch:
            self.plan(trainer.current_epoch)

    def start_task(self, task: int, size: int) -> None:
        """Fresh forgetting records for a new task's ``size`` samples; nothing removed yet."""
        self.task, self.num_samples = task, size
        self.events = torch.zeros(size, dtype=torch.long)
        self.learned = torch.zeros(size, dtype=torch.bool)
        self.prev_correct = torch.full((size,), -1, dtype=torch.int8)
        self.visit = torch.full((size,), -1, dtype=torch.int8)
        self.removed = torch.zeros(size, dtype=torch.bool)
        self.samples_total += size

    def plan(self, epoch: int) -> None:
        """This epoch's order: the task's samples not removed, shuffled by (seed, epoch)."""
        order = (~self.removed).nonzero().flatten()
        if self.shuffle:
            generator = epoch_generator(self.seed, epoch)
            order = order[torch.randperm(order.numel(), generator=generator)]
        self.set_plan(order, epoch)

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx) -> None:
        if self.ddr:
            self.finish_batch()
            self.record_visits(outputs)
            self.show_progress(pl_module, "removed%", round(100 * self.removed_fraction(), 1))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def removed_fraction(self) -> float:
        """Fraction of the current task's training samples removed so far."""
        return self.removal_history[-1][2] if self.removal_history and self.removal_history[-1][1] == self.task else 0.0

    def record_visits(self, outputs: Any) -> None:
        correct = outputs.get("sample_correct") if isinstance(outputs, Mapping) else None
        indices = self._batch_indices
        if not isinstance(correct, Tensor) or correct.dim() != 1:
            got = type(correct).__name__ if not isinstance(correct, Tensor) else tuple(correct.shape)
            raise ValueError(f"SparCL's data removal counts forgetting events: {CORRECT_CONTRACT}. Got {got}"
                             " (or pass ddr=False)")
        if indices is None or indices.numel() != correct.numel():
            expected = 0 if indices is None else indices.numel()
            raise ValueError(f"SparCL expected this batch to hold {expected} samples of its planned order but "
                             f"`sample_correct` has {correct.numel()}: the training DataLoader must batch its "
                             "sampler's indices in order (no custom batch_sampler or collate that drops samples)")
        # the epoch's visits live on the predictions' device: no host copy (and no sync) per step
        device = correct.device
        if self.visit.device != device:
            self.visit = self.visit.to(device)
        index = indices.to(device, non_blocking=True)
        self.visit[index] = torch.maximum(self.visit[index], correct.detach().to(torch.int8))

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.ddr:
            self.close_epoch(trainer, pl_module)

    @override
    def close_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", log: bool = True) -> None:
        """Fold the planned epoch's visits into the forgetting records and remove samples at a removal point."""
        now = require_task_progress(trainer, "SparCL")
        progress = task_of_epoch(self.plan_epoch, now.epochs_per_task, now.num_tasks)
        visit = reduced_across_ranks(trainer, self.visit.to(torch.int32), "max")
        update_forgetting(self.prev_correct, self.events, self.learned, visit)
        self.visit.fill_(-1)
        count = self.removal_count(progress)
        if count:
            generator = epoch_generator(self.seed, self.plan_epoch, offset=7)
            newly = removal_choice(self.events, self.learned, self.removed, count, generator)
            self.removed |= newly
            self.removed_total += int(newly.sum())
        self.closed_epoch = self.plan_epoch
        removed_fraction = float(self.removed.float().mean()) if self.num_samples else 0.0
        self.removal_history.append((self.plan_epoch, progress.task, removed_fraction))
        if log:
            self.log_metrics(pl_module, {
                "removed_fraction": removed_fraction,
                "forgetting_events_mean": float(self.events.float().mean()) if self.num_samples else 0.0,
            }, on_step=False, on_epoch=True)
            if count and figure_writer(trainer) is not None:
                self.draw_removal(trainer, newly)

    def draw_removal(self, trainer: "pl.Trainer", newly: Tensor) -> None:
        """Figure ``data`` at a removal point (rank 0): the task's kept and removed fractions per epoch,
        and the forgetting events of the samples kept and removed, with the cut between them."""
        task = self.removal_history[-1][1]
        epochs = [(e, f) for e, t, f in self.removal_history if t == task]
        xs = [e for e, _ in epochs]
        removed, kept = self.events[self.removed].float(), self.events[~self.removed].float()
        never = int((~self.learned & ~self.removed).sum())
        cut = float(self.events[newly].max()) if bool(newly.any()) else float("nan")
        top = int(self.events.max()) if self.events.numel() else 0

        def draw(figure) -> None:
            left, right = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
            stacked_bars(left, [str(e) for e in xs], {"kept": [1.0 - f for _, f in epochs],
                                                      "removed": [f for _, f in epochs]},
                         f"task {task}: its training samples, per epoch", "epoch", "fraction of the task's samples")
            bins = [b - 0.5 for b in range(top + 2)]
            title = f"forgetting events per sample ({never} never learned)"
            histogram(right, kept, title, "forgetting events", bins=bins, label=f"kept ({kept.numel()})",
                      integer=True)
            histogram(right, removed, title, "forgetting events", bins=bins, label=f"removed ({removed.numel()})",
                      threshold=("removed up to here", cut), integer=True)

        log_figure(trainer, self.technique, "data", draw, width=10.0)
        log_histogram(trainer, self.technique, "forgetting_events", self.events.float())

    # -- reporting ------------------------------------------------------------------------------
    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        rows = [r for r in super().savings(trainer, pl_module) if not r.quantity.startswith("training FLOPs")]
        if self.dgm and self.counted_steps:
            rows.append(SavingsRow(self.technique, "weight-gradient FLOPs (targeted layers)",
                                   f"{self.grad_density_steps / self.counted_steps:.3f} of dense",
                                   self.grad_density_steps / self.counted_steps))
        if self.ddr and self.samples_total:
            rows.append(SavingsRow(self.technique, "training samples removed", f"{self.removed_total} of "
                                   f"{self.samples_total} ({self.removed_total / self.samples_total:.1%})"))
        if self.full_steps:
            ratio = self.density_steps / self.full_steps
            rows.append(SavingsRow(self.technique, "training FLOPs (targeted layers, fwd+bwd, all steps)",
                                   f"{ratio:.3f} of dense on all data", ratio, "dense, all data"))
        return rows

    # -- state ----------------------------------------------------------------------------------
    def _whole_grad_masks(self) -> list[Tensor]:
        """The gradient masks whole: under FSDP2 each rank holds its rows, and one rank writes the
        callbacks' checkpoint entry (every rank calls ``state_dict``: one all-gather per layer)."""
        if self.masks is None or self.masks.group is None or not self.grad_masks:
            return [g.clone() for g in self.grad_masks]
        return [span.gather(g) for span, g in zip(self.masks.spans, self.grad_masks)]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "task": self.task, "events": self.events.clone(), "learned": self.learned.clone(),
            "prev_correct": self.prev_correct.clone(), "removed": self.removed.clone(),
            # every rank's visits of the epoch so far: a checkpoint inside an epoch holds them all
            "visit": reduced_across_ranks(self._trainer, self.visit.to(torch.int32), "max").to(torch.int8),
            "plan_epoch": self.plan_epoch, "order": self.order.clone(), "shuffle": self.shuffle,
            "removed_total": self.removed_total, "samples_total": self.samples_total,
            "grad_masks": self._whole_grad_masks(), "grad_mask_step": self.grad_mask_step,
            "grad_mask_epoch": self.grad_mask_epoch,
            "full_steps": self.full_steps, "grad_density_steps": self.grad_density_steps,
            "opened_epoch": self.opened_epoch, "removal_history": list(self.removal_history),
            **self.planned_position(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.task = int(state_dict["task"])
        for key in ("events", "learned", "prev_correct", "visit", "removed", "order"):
            setattr(self, key, state_dict[key].clone())
        self.num_samples = self.events.numel()
        self.plan_epoch, self.shuffle = int(state_dict["plan_epoch"]), state_dict["shuffle"]
        self.removed_total, self.samples_total = int(state_dict["removed_total"]), int(state_dict["samples_total"])
        self.grad_masks = [g.clone() for g in state_dict["grad_masks"]]
        if self.masks is not None and self.masks.group is not None and self.grad_masks:
            self.grad_masks = [span.take(g) for span, g in zip(self.masks.spans, self.grad_masks)]  # this rank's rows
        self._grad_nonzeros = counts(self.grad_masks, self.masks.group if self.masks is not None else None)
        self.grad_mask_step = int(state_dict["grad_mask_step"])
        self.grad_mask_epoch = int(state_dict["grad_mask_epoch"])
        self.full_steps = int(state_dict["full_steps"])
        self.grad_density_steps = float(state_dict["grad_density_steps"])
        self.opened_epoch = int(state_dict.get("opened_epoch", self.plan_epoch))
        self.removal_history = [tuple(r) for r in state_dict.get("removal_history", [])]
        self.restore_planned_position(state_dict)
        if "closed_epoch" not in state_dict and bool((self.visit < 0).all()):
            self.closed_epoch = self.plan_epoch  # an epoch-end checkpoint from before: that epoch was closed


__all__ = ["SparCL", "gradient_mask", "removal_choice", "tdm_scores", "tdm_update", "update_forgetting"]
