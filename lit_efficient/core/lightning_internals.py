"""The one seam to Lightning's (and torch's) internals.

Every access lit_efficient makes to a private attribute of Lightning or torch is a small function
here, and so is every method it replaces on a user's object (``training_step``,
``configure_optimizers``, ``train_dataloader``, a module's ``forward``, an optimizer's ``step``).
Each says what it reads and which public API would replace it. Porting to a new Lightning or
torch release means reading this file, and nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import _gather_all_tensors
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, Sampler

# -- replacing a method on one object -------------------------------------------------------------


def replace_method(obj: Any, name: str, replacement: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    """Make ``obj.<name>`` call ``replacement`` (an instance attribute; the class is untouched) and
    return the instance attribute it hides (None when the class's method showed). Undo with
    :func:`restore_method`. Lightning has no hook that lets a callback change what ``training_step``
    returns before backward, or what ``configure_optimizers`` returns; torch has none that skips a
    module's forward (forward hooks run after it)."""
    own = obj.__dict__.get(name)
    setattr(obj, name, replacement)
    return own


def restore_method(obj: Any, name: str, own: Optional[Callable[..., Any]] = None) -> None:
    """Undo :func:`replace_method`: put back ``own``, or let the class's method show again."""
    if own is None:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, own)


# -- the trainer ------------------------------------------------------------------------------------


def attached_trainer(pl_module: "pl.LightningModule") -> Optional["pl.Trainer"]:
    """The Trainer ``pl_module`` is attached to, or None. Reads ``LightningModule._trainer``: the
    public ``pl_module.trainer`` raises when none is attached."""
    return getattr(pl_module, "_trainer", None)


def logs_written_this_step(trainer: "pl.Trainer") -> bool:
    """Whether Lightning writes step-level metrics at this training step (every
    ``log_every_n_steps``). Reads ``trainer._logger_connector.should_update_logs``; no public API
    tells (it would be ``trainer.should_update_logs``)."""
    return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))


def step_metric_step(trainer: "pl.Trainer") -> int:
    """The step Lightning writes a training step's metrics at (its ``_batches_that_stepped``, one
    behind ``global_step`` once the step's optimizer has run), so a scalar written directly lands
    on the same axis as the ones ``self.log`` writes. Reads ``fit_loop.epoch_loop._batches_that_stepped``;
    no public API gives it."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def is_last_batch(trainer: "pl.Trainer") -> bool:
    """Whether the training batch now running is the epoch's last. Reads the fit loop's batch
    progress (public attributes of the loops, but not a documented API)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def before_late_restore(trainer: "pl.Trainer", state_key: str,
                        apply: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Where the strategy restores a checkpoint after ``on_fit_start`` (``restore_checkpoint_after_setup``:
    ``ModelParallelStrategy``), call ``apply`` with the state the callback ``state_key`` saved in
    it, just before the strategy loads the model and optimizer (strictly, through torch's distributed
    checkpoint) and so before the callback's own ``load_state_dict``; returns the undo (call it from
    ``teardown``). Elsewhere (DDP, one device: callbacks are restored before ``on_fit_start``), and
    when ``fit`` resumes from nothing or the checkpoint holds no such state, nothing happens.

    Replaces ``strategy.load_checkpoint`` on the instance for one call: at ``on_fit_start`` the path
    of the checkpoint about to be restored is only a local of ``Trainer._run``
    (``trainer.ckpt_path`` is set later, in ``_CheckpointConnector.resume_start``). Reads
    Lightning's private checkpoint layout: ``meta.pt`` (``_METADATA_FILENAME``) of a sharded folder,
    or the whole file of a full one (``save_distributed_checkpoint=False``), and its ``"callbacks"``
    entry. The public replacement would be callbacks' state restored before the optimizer's under
    ``restore_checkpoint_after_setup``, or a callback hook before the strategy loads a checkpoint."""
    from pathlib import Path

    from lightning.fabric.utilities.load import _METADATA_FILENAME

    strategy = trainer.strategy
    if not strategy.restore_checkpoint_after_setup:
        return lambda: None
    load = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        undo()
        path = Path(strategy.broadcast(checkpoint_path))  # as the strategy does: every rank loads rank 0's
        weights_only = kwargs.get("weights_only", args[0] if args else None)
        saved: dict[str, Any] = {}  # not a checkpoint: the strategy says so
        if (path / _METADATA_FILENAME).is_file():
            saved = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        elif path.is_file():
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        state = (saved.get("callbacks") or {}).get(state_key)
        del saved
        if state is not None:
            apply(state)
        return load(checkpoint_path, *args, **kwargs)

    own = replace_method(strategy, "load_checkpoint", load_checkpoint)

    def undo() -> None:
        if strategy.__dict__.get("load_checkpoint") is load_checkpoint:
            restore_method(strategy, "load_checkpoint", own)

    return undo


def is_compiled(pl_module: "pl.LightningModule") -> bool:
    """Whether ``pl_module`` was passed through ``torch.compile``. Reads Lightning's
    ``LightningModule._compiler_ctx``; no public flag exists."""
    return bool(getattr(pl_module, "_compiler_ctx", None))


# -- the training dataloader --------------------------------------------------------------------------


def wrap_train_dataloader(trainer: "pl.Trainer", wrap: Callable[[Any], DataLoader], who: str) -> Callable[[], None]:
    """Make every training dataloader Lightning builds from now on pass through ``wrap``; returns the
    undo. Reads ``trainer.fit_loop._data_source`` (the module, datamodule or loader ``fit`` was
    given); a public replacement would be a hook that lets a callback wrap the train dataloader.
    Errors name ``who``."""
    source = trainer.fit_loop._data_source
    instance = source.instance
    if isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
        original = getattr(instance, source.name)
        own = replace_method(instance, source.name, lambda: wrap(original()))
        return lambda: restore_method(instance, source.name, own)
    if isinstance(instance, DataLoader):
        source.instance = wrap(instance)
        return lambda: None
    raise ValueError(f"{who} needs one training DataLoader (or a module/datamodule whose "
                     f"`train_dataloader` returns one); got {type(instance).__name__}")


def with_sampler(loader: DataLoader, sampler: Sampler) -> DataLoader:
    """``loader`` rebuilt with ``sampler`` (same dataset, batch size, workers, collate ...), as
    Lightning rebuilds loaders for a ``DistributedSampler``. Calls Lightning's private
    ``_update_dataloader``; the public equivalent would be a documented loader re-instantiation."""
    return _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)


# -- distributed ----------------------------------------------------------------------------------------


def all_gather_uneven(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (shapes may differ along dim 0), in rank order. Calls Lightning's
    private ``_gather_all_tensors`` (pads, all-gathers, trims); ``torch.distributed.all_gather``
    with sizes exchanged first is the public equivalent."""
    return _gather_all_tensors(tensor)


def ensure_find_unused_parameters(strategy: Any) -> bool:
    """Make a DDP strategy wrap the model with ``find_unused_parameters=True`` (before it wraps it,
    in ``setup``); True if that changed anything. Edits ``DDPStrategy._ddp_kwargs``; the public way
    is ``DDPStrategy(find_unused_parameters=True)`` when the user builds the strategy."""
    if not isinstance(strategy, DDPStrategy) or strategy._ddp_kwargs.get("find_unused_parameters", False):
        return False
    strategy._ddp_kwargs["find_unused_parameters"] = True
    return True


# -- torch's LR schedulers ----------------------------------------------------------------------------


def inner_schedulers(scheduler: Any) -> list[Any]:
    """The schedulers inside ``SequentialLR``/``ChainedScheduler`` (their private ``_schedulers``;
    there is no public accessor)."""
    return list(getattr(scheduler, "_schedulers", []))


def mark_step_tracked(optimizer: torch.optim.Optimizer) -> None:
    """Let torch's LR schedulers see ``optimizer.step`` as tracked, for an optimizer that replaced the
    one they were built with, so they do not warn that the step order is wrong. Sets torch's private
    ``_opt_called`` / ``_wrapped_by_lr_sched`` markers, as ``LRScheduler.__init__`` does for its own
    optimizer; building the schedulers after the optimizer is final is the public way."""
    step = optimizer.step
    if getattr(step, "_wrapped_by_lr_sched", False):
        return

    def tracked(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True  # type: ignore[attr-defined]
        return step(*args, **kwargs)

    tracked._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    replace_method(optimizer, "step", tracked)


# -- torch modules ----------------------------------------------------------------------------------


def swap_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` (a tensor computed from the parameter, e.g. a masked copy) in the slot of
    parameter ``name`` for one forward, and return what was there; swap back from a forward hook.
    Writes ``Module._parameters`` directly, because ``setattr`` refuses a non-Parameter there;
    ``torch.nn.utils.parametrize`` is the public way, at the cost of a parametrization per call."""
    current = module._parameters[name]
    module._parameters[name] = value  # type: ignore[assignment]
    return current
