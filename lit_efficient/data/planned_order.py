"""A training loader whose epoch order a callback plans: how data-pruning techniques skip samples
for real (InfoBatch, SparCL's data removal) without touching the module or the datamodule.

At ``setup`` the training dataloader is rebuilt around a :class:`PlannedOrderSampler` (a
``DistributedSampler``, so Lightning does not inject its own; under DDP it splits the planned
order across ranks as ``DistributedSampler`` does). The epoch's batches hold consecutive slices of
this rank's share of the order, ``B`` samples each; the callback counts the batches it has seen in
the epoch (never Lightning's ``batch_idx``), which is how each per-sample output finds its dataset
index. The dataloader is reloaded every epoch (``reload_dataloaders_every_n_epochs=1``) so
Lightning recounts the batches of epochs whose length changes.

Resume in the middle of an epoch is exact: the number of batches trained in the current plan is
part of the callback's state, and a resumed epoch starts the sampler at the first sample of the
first batch not yet trained, with the same plan: nothing replayed, nothing skipped. The loader
also speaks Lightning's stateful-dataloader protocol (``state_dict``/``load_state_dict``), so
Lightning knows it resumes exactly.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from lit_efficient.core.composition import SAMPLE_ORDER, Claim
from lit_efficient.core.device import pinned
from lit_efficient.core.lightning_internals import with_sampler, wrap_train_dataloader


class PlannedOrderSampler(DistributedSampler):
    """Yields this rank's share of ``owner.order`` (the epoch's planned dataset indices).

    The order is padded by wrapping around to a multiple of ``num_replicas`` and rank ``r`` takes
    positions ``r, r + W, …``; the share is recorded as ``owner.local_order`` when iteration starts.
    """

    def __init__(self, dataset: Any, owner: "PlannedOrder", num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.owner = owner

    def local_order(self) -> Tensor:
        order = self.owner.order
        total = math.ceil(order.numel() / self.num_replicas) * self.num_replicas
        if total > order.numel():
            order = torch.cat([order, order.repeat(math.ceil(total / order.numel()))[: total - order.numel()]])
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # a generator: nothing is read before the first batch is requested, i.e. after the plan and
        # a checkpoint's position are restored; a resumed epoch starts at its first untrained batch
        local = pinned(self.local_order())  # its batches' slices go to the device without a stall
        self.owner.local_order = local
        yield from local[self.owner.trained_batches * self.owner.planned_batch_size :].tolist()

    def __len__(self) -> int:
        return math.ceil(self.owner.order.numel() / self.num_replicas)


def _restored_with_the_callback(state: dict[str, Any]) -> None:
    """The planned loader's ``load_state_dict``: its position came back with its callback's state."""


class PlannedOrder:
    """Mixin for callbacks that plan each epoch's sample order (see the module docstring).

    The callback calls :meth:`follow_planned_order` from ``setup`` and :meth:`stop_following` from
    ``teardown``, keeps ``self.order`` (dataset indices of the epoch, in order) up to date, and
    implements :meth:`dataset_ready`, called each time the loader is (re)built.
    """

    order: Tensor
    local_order: Tensor
    shuffle: Optional[bool]
    started_batches: int  # batches of the current plan begun on this rank
    trained_batches: int  # ... and finished (their on_train_batch_end ran): where a resume continues
    plan_epoch: int
    closed_epoch: int

    def plans_sample_order(self) -> bool:
        """Whether this callback rebuilds the training loader in this run (override to make it optional)."""
        return True

    def claims(self) -> list[Claim]:
        own = [SAMPLE_ORDER] if self.plans_sample_order() else []
        return [*super().claims(), *own]  # type: ignore[misc]  # a mixin of EfficientCallbacks

    def init_planned_order(self) -> None:
        self.order = torch.zeros(0, dtype=torch.long)
        self.local_order = torch.zeros(0, dtype=torch.long)
        self.started_batches = self.trained_batches = 0
        self.plan_epoch = -1  # the epoch ``order`` was planned for
        self.closed_epoch = -1  # the last epoch whose end was processed
        self._unwrap_source: Optional[Callable[[], None]] = None
        self._batch_size = 1
        self._drop_last = False

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Lightning 2.6 resumes a checkpoint taken on an epoch's last batch straight into the next
        # epoch, without the finished epoch's on_train_epoch_end (nor the next one's start hook).
        # on_train_start comes after the loops are restored and before the next epoch's loader is
        # built: close the planned epoch here, so that its records count and the next plan is ready.
        super().on_train_start(trainer, pl_module)  # type: ignore[misc]  # a mixin of EfficientCallbacks
        if self.plans_sample_order() and self.closed_epoch < self.plan_epoch < trainer.current_epoch:
            self.close_epoch(trainer, pl_module, log=False)  # logged now, it would count for the next epoch

    def close_epoch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", log: bool = True) -> None:
        """Fold the planned epoch's records into the technique's state (from ``on_train_epoch_end``, or
        from ``on_train_start`` when Lightning skipped that), set ``closed_epoch``, and log if ``log``."""
        raise NotImplementedError

    @property
    def planned_batch_size(self) -> int:
        return self._batch_size

    def set_plan(self, order: Tensor, epoch: int) -> None:
        """Make ``order`` (dataset indices) the plan of ``epoch``; no batch of it trained yet."""
        self.order, self.plan_epoch = order, epoch
        self.started_batches = self.trained_batches = 0

    def planned_position(self) -> dict[str, int]:
        """Where this rank is in the current plan (for the callback's ``state_dict``)."""
        return {"trained_batches": self.trained_batches, "closed_epoch": self.closed_epoch}

    def restore_planned_position(self, state: dict[str, Any]) -> None:
        """Continue the current plan after its trained batches (``state`` from :meth:`planned_position`;
        absent in checkpoints from before mid-epoch resume: the epoch restarts from its first batch)."""
        self.started_batches = self.trained_batches = int(state.get("trained_batches", 0))
        self.closed_epoch = int(state.get("closed_epoch", self.plan_epoch - 1))

    def follow_planned_order(self, trainer: "pl.Trainer") -> None:
        """Make the training dataloader draw from a :class:`PlannedOrderSampler` of this callback."""
        self._unwrap_source = wrap_train_dataloader(trainer, lambda loader: self.planned_dataloader(loader, trainer),
                                                    type(self).__name__)
        trainer.reload_dataloaders_every_n_epochs = 1  # epochs change length: Lightning recounts each one

    def stop_following(self) -> None:
        if self._unwrap_source is not None:
            self._unwrap_source()
            self._unwrap_source = None

    def planned_dataloader(self, loader: Any, trainer: "pl.Trainer") -> DataLoader:
        """``loader`` rebuilt to draw its samples from a :class:`PlannedOrderSampler`."""
        name = type(self).__name__
        if not isinstance(loader, DataLoader):
            raise ValueError(f"{name} needs `train_dataloader` to return one DataLoader; got {type(loader).__name__}")
        if loader.batch_size is None:
            raise ValueError(f"{name} maps batch b to samples [b*B, (b+1)*B) of its order: the training DataLoader "
                             "needs `batch_size` (a custom `batch_sampler` is not supported)")
        try:
            size = len(loader.dataset)
        except TypeError as err:
            raise ValueError(f"{name} keeps one record per dataset index: the training dataset needs `len`") from err
        if self.shuffle is None:
            self.shuffle = isinstance(loader.sampler, RandomSampler)
        self._batch_size, self._drop_last = loader.batch_size, loader.drop_last
        self.dataset_ready(size, trainer)
        sampler = PlannedOrderSampler(loader.dataset, self, trainer.world_size, trainer.global_rank)
        planned = with_sampler(loader, sampler)
        # Lightning's stateful-loader protocol, so that it knows a mid-epoch checkpoint resumes exactly.
        # The position itself travels with the callback's state, restored before the loader is built
        # (and possibly moved on to a new plan since), so what Lightning hands back is not needed.
        planned.state_dict = self.planned_position
        planned.load_state_dict = _restored_with_the_callback
        return planned

    def dataset_ready(self, size: int, trainer: "pl.Trainer") -> None:
        """The loader was (re)built over a dataset of ``size`` samples: make sure ``order`` is planned."""
        raise NotImplementedError

    def start_batch(self) -> Tensor:
        """Dataset indices of the batch beginning now on this rank (call once per training batch, from
        ``on_train_batch_start``): the next ``B`` samples of this rank's share of the plan."""
        start = self.started_batches * self._batch_size
        self.started_batches += 1
        return self.local_order[start : start + self._batch_size]

    def finish_batch(self) -> None:
        """The batch begun last is trained (call from ``on_train_batch_end``)."""
        self.trained_batches = self.started_batches

    def optimizer_steps(self, samples: int, trainer: "pl.Trainer") -> int:
        """Optimizer steps an epoch of ``samples`` (before the split across ranks) takes on this rank."""
        local = math.ceil(samples / trainer.world_size)
        batches = local // self._batch_size if self._drop_last else math.ceil(local / self._batch_size)
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))
