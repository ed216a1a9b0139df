"""InfoBatch: skip well-learned samples each epoch, rescale the rest so the gradient stays unbiased.

Paper: Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning",
ICLR 2024, https://arxiv.org/abs/2303.04947 (reference code: github.com/NUS-HPC-AI-Lab/InfoBatch).

Each sample's score is its latest loss. At the start of every epoch, the *well-learned* samples
(seen before, score below the mean score) lose a random ``prune_ratio`` of their number for this
epoch; the well-learned samples kept get loss multiplier ``n_well / (n_well − n_pruned)``
(= 1/(1 − prune_ratio) up to rounding), so the expected loss over the epoch is unchanged. The
final ``1 − delta`` of the epochs use all data (annealing). Pruned samples are never loaded, so
the saving is real: fewer batches per epoch.

How it plugs into Lightning without changing the module or datamodule: the training dataloader
follows the epoch's planned order (:mod:`lit_efficient.data.planned_order`), which is how
each per-sample loss finds its dataset index; epochs get shorter, so step-interval LR schedulers
are advanced by the skipped steps and a schedule built on ``estimated_stepping_batches`` still
ends at the end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from typing_extensions import override

from lit_efficient.core.checks import check_bool, check_fraction, check_int
from lit_efficient.core.distributed import reduced_across_ranks
from lit_efficient.core.figures import epoch_figure_due, figure_writer, histogram, log_figure, stacked_bars
from lit_efficient.core.logs import log_histogram
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.seeding import epoch_generator
from lit_efficient.core.time import Time, TimeSpec
from lit_efficient.data.planned_order import PlannedOrder
from lit_efficient.data.sample_losses import NonfiniteCount, SampleLossCallback


def infobatch_plan(scores: Tensor, seen: Tensor, prune_ratio: float,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One epoch's plan: which samples to keep, and each sample's loss multiplier.

    Well-learned samples are those ``seen`` with score below the mean score of the seen samples;
    ``round(prune_ratio · n_well)`` of them, chosen uniformly by ``generator``, are dropped, and the
    kept well-learned ones get multiplier ``n_well / (n_well − n_pruned)``: the expected
    multiplier of every well-learned sample is exactly 1 (unbiased). Everything else: kept, 1.
    """
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    multipliers = torch.ones(scores.numel(), dtype=torch.float32)
    if not bool(seen.any()) or prune_ratio <= 0:
        return keep, multipliers
    mean = scores[seen].double().mean()
    well = seen & (scores.double() < mean)
    well_indices = well.nonzero().flatten()
    n_well = well_indices.numel()
    n_pruned = min(int(round(prune_ratio * n_well)), n_well - 1) if n_well else 0
    if n_pruned <= 0:
        return keep, multipliers
    pruned = well_indices[torch.randperm(n_well, generator=generator)[:n_pruned]]
    keep[pruned] = False
    multipliers[well & keep] = n_well / (n_well - n_pruned)
    return keep, multipliers


def steps_owed(done: int, full: int, planned: int) -> int:
    """Full-data steps a pruned epoch of ``planned`` optimizer steps (of ``full``) has skipped after ``done`` of
    them: the epoch's schedule is stretched evenly over its real steps."""
    return (done * full) // planned - done if planned else 0


@dataclass
class PrunedEpochClock:
    """Full-data time in a run whose epochs are pruned, from one epoch's plan.

    An epoch that would take ``full`` optimizer steps on all data takes ``planned`` as pruned: its
    steps are spread over the full epoch's (:func:`steps_owed`), so after optimizer step ``step``
    the run stands at ``step + skipped(step)`` in full-data steps, and step-wise LR schedulers are
    given the steps owed on top of the real ones.
    """

    epoch: int = -1  # the epoch measured (-1: none yet)
    start: int = 0  # global step at its start
    full: int = 0  # its optimizer steps on all data
    planned: int = 0  # its optimizer steps as planned
    skipped_before: int = 0  # steps skipped in the epochs before it
    scheduler_steps: int = 0  # extra LR-scheduler steps given in it

    def open(self, epoch: int, start: int, full: int, planned: int) -> None:
        if self.epoch >= 0:
            self.skipped_before += self.full - self.planned
        self.epoch, self.start, self.full, self.planned, self.scheduler_steps = epoch, start, full, planned, 0

    def done(self, step: int) -> int:
        """Optimizer steps of this epoch done by optimizer step ``step``."""
        return min(max(0, step - self.start), self.planned)

    def skipped(self, step: int) -> int:
        return 0 if self.epoch < 0 else self.skipped_before + steps_owed(self.done(step), self.full, self.planned)

    def scheduler_steps_owed(self, step: int) -> int:
        return steps_owed(self.done(step), self.full, self.planned) - self.scheduler_steps

    def state_dict(self) -> dict[str, Any]:
        return {"extra_scheduler_steps": self.scheduler_steps,  # the keys of checkpoints from before this class
                "clock": [self.epoch, self.start, self.full, self.planned, self.skipped_before]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        clock = state.get("clock", [-1, 0, 0, 0, 0])  # absent from checkpoints before the clock existed
        self.epoch, self.start, self.full, self.planned, self.skipped_before = map(int, clock)
        self.scheduler_steps = int(state["extra_scheduler_steps"])


class InfoBatch(PlannedOrder, SampleLossCallback):
    r"""Loss-based dynamic data pruning with unbiased rescaling (InfoBatch, ICLR 2024).

    The module must follow the per-sample loss contract
    (``return {"loss": losses.mean(), "sample_losses": losses}``) and train by epochs
    (``Trainer(max_epochs=...)``); the training dataloader needs a ``batch_size`` (no custom
    ``batch_sampler``) and a dataset with ``len``.

    Args:
        prune_ratio: fraction of the well-learned samples skipped each epoch, in [0, 1)
            (default 0.5, the paper's).
        delta: when pruning stops, as a time spec in epochs or a fraction of the run: ``0.875``
            (default, the paper's) prunes the first 87.5% of the epochs and uses all data in the
            rest; ``"35ep"`` prunes the first 35 epochs. InfoBatch plans whole epochs, so optimizer
            steps (``"st"``) are refused.
        shuffle: shuffle each epoch's order (default: as the original training dataloader did).
        seed: seed of the pruning draws and of the shuffling (identical on all ranks).
        progress_bar: show ``skipped%=<percent of this epoch's samples removed>`` in the progress
            bar (default True).

    Logged under ``efficient/infobatch/``: ``skipped_fraction`` (of the dataset, this epoch),
    ``samples_saved`` (cumulative), ``well_learned_fraction``, ``score_mean``; a row in the
    savings table with the samples forwarded relative to full-data training. In TensorBoard, at
    the start of every epoch that prunes (of about 16 spread over a longer run): the figure
    ``data`` (kept/pruned fractions of the epochs so far; the scores with the mean-score
    threshold) and the histogram ``scores``.
    """

    technique = "infobatch"

    def __init__(self, prune_ratio: float = 0.5, delta: TimeSpec = 0.875, shuffle: Optional[bool] = None,
                 seed: int = 0, progress_bar: bool = True) -> None:
        self.prune_ratio = check_fraction(prune_ratio, "prune_ratio")
        self.delta = delta
        self._pruning_until = Time.parse(delta, "delta")
        if self._pruning_until.unit == "st":
            raise ValueError(f"`delta`={delta!r}: InfoBatch plans whole epochs; give epochs ('35ep') or a fraction "
                             "of the run (0.875)")
        if self._pruning_until.value == 0:
            raise ValueError(f"`delta` must be positive (some epochs must prune); got {delta!r}")
        self.shuffle = None if shuffle is None else check_bool(shuffle, "shuffle")
        self.seed = check_int(seed, "seed")
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        self.init_planned_order()
        self.num_samples = 0
        self.scores = torch.zeros(0)
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.epoch_sum = torch.zeros(0, dtype=torch.float64)
        self.epoch_count = torch.zeros(0, dtype=torch.long)
        self.multipliers = torch.zeros(0)
        self.samples_forwarded = 0  # planned sample visits, over all finished and current epochs
        self.samples_full = 0
        self.clock = PrunedEpochClock()  # the full-data clock other callbacks' schedules read
        self.removed: list[tuple[int, float]] = []  # (epoch, fraction of the dataset pruned) of every epoch begun
        self._restored = False
        self._batch_indices: Optional[Tensor] = None
        self._multipliers_on: Optional[Tensor] = None  # this epoch's multipliers on the losses' device
        self._nonfinite = NonfiniteCount("InfoBatch")

    # -- the dataloader ---------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ValueError("InfoBatch prunes each epoch and uses all data for the last `1 - delta` of the epochs: "
                             "train by epochs with `Trainer(max_epochs=...)`")
        self.follow_planned_order(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.stop_following()

    @override
    def dataset_ready(self, size: int, trainer: "pl.Trainer") -> None:
        self.prepare_dataset(size)
        if self.plan_epoch < 0:
            self.prepare_epoch(trainer.current_epoch, trainer.max_epochs)

    def prepare_dataset(self, size: int) -> None:
        if self.num_samples == size:
            return
        if self._restored and self.num_samples:
            raise ValueError(f"InfoBatch's checkpoint holds scores for {self.num_samples} samples but the training "
                             f"dataset has {size}")
        self.num_samples = size
        self.scores = torch.zeros(size)
        self.seen = torch.zeros(size, dtype=torch.bool)
        self.epoch_sum = torch.zeros(size, dtype=torch.float64)
        self.epoch_count = torch.zeros(size, dtype=torch.long)
        self.plan_epoch = -1

    def pruning_epochs(self, max_epochs: int) -> int:
        """How many leading epochs prune (the rest use all data)."""
        if self._pruning_until.unit == "ep":
            return min(max_epochs, int(self._pruning_until.value))
        return int(self._pruning_until.value * max_epochs)

    def prepare_epoch(self, epoch: int, max_epochs: int) -> None:
        """Plan ``epoch``: prune (before the annealing epochs) and order the samples."""
        generator = epoch_generator(self.seed, epoch)
        if epoch < self.pruning_epochs(max_epochs):
            keep, self.multipliers = infobatch_plan(self.scores, self.seen, self.prune_ratio, generator)
        else:
            keep, self.multipliers = torch.ones(self.num_samples, dtype=torch.bool), torch.ones(self.num_samples)
        self._multipliers_on = None
        order = keep.nonzero().flatten()
        if self.shuffle:
            order = order[torch.randperm(order.numel(), generator=generator)]
        self.set_plan(order, epoch)
        self.samples_forwarded += order.numel()
        self.samples_full += self.num_samples

    # -- the losses -------------------------------------------------------------------------------

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        self.open_epoch(trainer)  # Lightning skips on_train_epoch_start after some resumes
        self._batch_indices = self.start_batch()
        self.show_progress(pl_module, "skipped%", round(100 * self.skipped_fraction(), 1))

    @override
    def sample_multipliers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", losses: Tensor,
                           finite: Tensor, output: Mapping[str, Any]) -> Optional[Tensor]:
        indices = self._batch_indices
        if indices is None or indices.numel() != losses.numel():
            got = "none" if indices is None else indices.numel()
            raise ValueError(f"InfoBatch expected this batch to hold samples [b*B, (b+1)*B) of its sampler's order "
                             f"({got} samples) but `sample_losses` has {losses.numel()}: the training DataLoader must "
                             "batch its sampler's indices in order (no custom batch_sampler or collate that drops "
                             "samples)")
        # the epoch's sums live on the losses' device: no host copy (and no sync) per step
        device = losses.device
        if self.epoch_sum.device != device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self.epoch_sum, self.epoch_count = self.epoch_sum.to(device, dtype), self.epoch_count.to(device)
        index = indices.to(device, non_blocking=True)
        self.epoch_sum.index_add_(0, index, torch.where(finite, losses.detach().to(self.epoch_sum.dtype), 0.0))
        self.epoch_count.index_add_(0, index, finite.long())
        self._nonfinite.add(finite)
        if self._multipliers_on is None or self._multipliers_on.device != device:  # once an epoch
            self._multipliers_on = self.multipliers.to(device)
        return self._multipliers_on[index]

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.finish_batch()
        self.catch_up_schedulers(trainer)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.open_epoch(trainer)

    def open_epoch(self, trainer: "pl.Trainer") -> None:
        """Start this epoch's full-data clock (once; a resume inside the epoch brought it along)."""
        if trainer.current_epoch != self.clock.epoch:
            self.clock.open(trainer.current_epoch, trainer.global_step,
                            full=self.optimizer_steps(self.num_samples, trainer),
                            planned=self.optimizer_steps(self.order.numel(), trainer))
            if not self.removed or self.removed[-1][0] != self.plan_epoch:
                self.removed.append((self.plan_epoch, self.skipped_fraction()))
            if self.pruning_decided(trainer.max_epochs) and epoch_figure_due(trainer):
                self.draw_data(trainer)

    def skipped_fraction(self) -> float:
        """The fraction of the dataset this epoch's plan leaves out (host-side counts: no sync)."""
        return 1.0 - self.order.numel() / max(1, self.num_samples)

    def pruning_decided(self, max_epochs: int) -> bool:
        """Whether this epoch's plan came from the scores (not the first epoch, nor annealing)."""
        return (self.prune_ratio > 0 and 0 < self.plan_epoch < self.pruning_epochs(max_epochs)
                and bool(self.seen.any()))

    def draw_data(self, trainer: "pl.Trainer") -> None:
        """The figure and histogram of this epoch's pruning decision (rank 0 with TensorBoard only)."""
        if figure_writer(trainer) is None:
            return
        scores = self.scores[self.seen]
        threshold = float(scores.double().mean())
        well = int((scores.double() < threshold).sum())
        pruned = self.num_samples - self.order.numel()
        unseen = self.num_samples - scores.numel()
        epochs = [str(epoch) for epoch, _ in self.removed]
        removed = [fraction for _, fraction in self.removed]
        note = (f"{well} of {scores.numel()} scored are well-learned (< mean)\n"
                f"{pruned} of them pruned, the rest weighted ×{well / max(1, well - pruned):.2f}"
                + (f"\n{unseen} never scored: kept" if unseen else ""))

        def draw(figure) -> None:
            left = figure.add_subplot(1, 2, 1)
            stacked_bars(left, epochs, {"kept": [1 - r for r in removed], "pruned": removed},
                         f"Data per epoch (pruning until epoch {self.pruning_epochs(trainer.max_epochs)})",
                         "epoch", "fraction of the dataset")
            left.set_ylim(0, 1.25)
            left.legend(fontsize=8, loc="upper right", ncol=2)
            if len(epochs) > 30:  # a long run: label every few epochs only
                ticks = list(range(0, len(epochs), -(-len(epochs) // 15)))
                left.set_xticks(ticks)
                left.set_xticklabels([epochs[i] for i in ticks], rotation=0, fontsize=8)
            right = figure.add_subplot(1, 2, 2)
            histogram(right, scores, f"Scores (latest loss per sample), epoch {self.plan_epoch}", "score",
                      threshold=(f"threshold: mean score {threshold:.3g}", threshold))
            right.set_ylim(0, right.get_ylim()[1] * 1.3)  # room above the bars for the note and legend
            right.text(0.02, 0.97, note, transform=right.transAxes, ha="left", va="top", fontsize=8, zorder=5,
                       bbox={"facecolor": "white", "edgecolor": "#bbbbbb"})

        log_figure(trainer, self.technique, "data", draw, width=13.0, height=5.0)
        log_histogram(trainer, self.technique, "scores", scores)

    def full_epoch_steps(self, trainer: "pl.Trainer") -> Optional[int]:
        """Optimizer steps of an epoch on all data: what every schedule's run length counts
        (:meth:`lit_efficient.core.time.TrainingLength.from_trainer`), whatever this epoch prunes.
        None before the loader exists, or when Lightning limits the batches of an epoch itself."""
        if not self.num_samples or trainer.limit_train_batches != 1.0 or trainer.overfit_batches:
            return None
        return self.optimizer_steps(self.num_samples, trainer)

    def skipped_steps(self, step: int) -> int:
        """Optimizer steps that pruning has skipped by optimizer step ``step``: full-data time is
        ``step`` plus this (:func:`lit_efficient.core.clock.run_position`). Read from the step and
        this epoch's plan alone, so it is the same whenever in a step a callback asks."""
        return self.clock.skipped(step)

    def catch_up_schedulers(self, trainer: "pl.Trainer") -> None:
        """Advance step-interval LR schedulers so this epoch covers a full epoch's worth of schedule."""
        owed = self.clock.scheduler_steps_owed(trainer.global_step)
        if owed <= 0:
            return  # no optimizer step on this micro-batch, or none owed
        for config in trainer.lr_scheduler_configs:
            if config.interval == "step" and not isinstance(config.scheduler, ReduceLROnPlateau):
                for _ in range(owed // max(1, config.frequency) if config.frequency > 1 else owed):
                    config.scheduler.step()
        self.clock.scheduler_steps += owed

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._nonfinite.flush()  # read once an epoch, not every step
        self.close_epoch(trainer, pl_module)

    @override
    def close_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", log: bool = True) -> None:
        """Fold the planned epoch's losses into the scores, log, and plan the next epoch."""
        epoch_sum = reduced_across_ranks(trainer, self.epoch_sum).double()
        epoch_count = reduced_across_ranks(trainer, self.epoch_count)
        updated = epoch_count > 0
        self.scores[updated] = (epoch_sum[updated] / epoch_count[updated]).float()
        self.seen |= updated
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        skipped = 1.0 - self.order.numel() / max(1, self.num_samples)
        well = self.seen & (self.scores < self.scores[self.seen].mean()) if self.seen.any() else self.seen
        if log:
            self.log_metrics(pl_module, {
                "skipped_fraction": skipped,
                "samples_saved": float(self.samples_full - self.samples_forwarded),
                "well_learned_fraction": float(well.float().mean()) if self.num_samples else 0.0,
                "score_mean": float(self.scores[self.seen].mean()) if self.seen.any() else 0.0,
            }, on_step=False, on_epoch=True)
        self.closed_epoch = self.plan_epoch
        self.prepare_epoch(self.plan_epoch + 1, trainer.max_epochs)

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        # the plan made for the epoch after the last one never ran
        forwarded = self.samples_forwarded - self.order.numel()
        full = self.samples_full - self.num_samples
        if full <= 0:
            return []
        shown = f"{forwarded} of {full} ({1 - forwarded / full:.1%} skipped)"
        return [SavingsRow(self.technique, "samples forwarded", shown, forwarded / full, "full data")]

    # -- checkpoint -------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "scores": self.scores.clone(), "seen": self.seen.clone(),
            # every rank's records of the epoch so far: a checkpoint inside an epoch holds them all
            "epoch_sum": reduced_across_ranks(self._trainer, self.epoch_sum).double(),
            "epoch_count": reduced_across_ranks(self._trainer, self.epoch_count), "order": self.order.clone(),
            "multipliers": self.multipliers.clone(), "plan_epoch": self.plan_epoch, "shuffle": self.shuffle,
            "samples_forwarded": self.samples_forwarded, "samples_full": self.samples_full,
            **self.clock.state_dict(),
            **self.planned_position(),
            "removed": [list(row) for row in self.removed],
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("scores", "seen", "epoch_sum", "epoch_count", "order", "multipliers"):
            setattr(self, key, state_dict[key].clone())
        self._multipliers_on = None
        self.num_samples = self.scores.numel()
        self.plan_epoch, self.shuffle = int(state_dict["plan_epoch"]), state_dict["shuffle"]
        self.samples_forwarded = int(state_dict["samples_forwarded"])
        self.samples_full = int(state_dict["samples_full"])
        self.clock.load_state_dict(state_dict)
        self.restore_planned_position(state_dict)
        self.removed = [(int(epoch), float(fraction)) for epoch, fraction in state_dict.get("removed", [])]
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and trainer.global_rank != 0:
            self.epoch_sum.zero_()  # the checkpoint's records are every rank's: rank 0 carries them on
            self.epoch_count.zero_()
        self._restored = True


__all__ = ["InfoBatch", "infobatch_plan", "steps_owed"]
