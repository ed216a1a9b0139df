"""Across ranks: which strategies a technique supports, and the collectives techniques share.

Lightning's strategies are the distributed engine; these helpers only gather or reduce what a
technique decides from, so that every rank decides alike.
"""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor

from lit_efficient.core.lightning_internals import all_gather_uneven


def refuse_sharded_strategies(trainer, technique: str, reason: str, fsdp2: bool = False) -> None:
    """Refuse strategies that shard or wrap parameters for ``technique``, because ``reason`` (it needs
    each weight whole on every rank, or it is untested there). Call from ``setup``.

    With ``fsdp2`` the technique supports FSDP2 through Lightning's ``ModelParallelStrategy`` with
    ``tensor_parallel_size=1`` (parameters sharded on dim 0 over the data-parallel ranks): that is
    allowed, and the refusal of FSDP1 (``FSDPStrategy``) and DeepSpeed names it as the supported way.
    """
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy) and fsdp2:
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise RuntimeError(f"{technique} supports ModelParallelStrategy for data-parallel sharding (FSDP2) "
                               f"only: tensor_parallel_size must be 1, got {tensor_parallel}")
        return
    # DeepSpeedStrategy subclasses DDPStrategy but partitions parameters and optimizer state
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        supported = ("single-device, DDP and FSDP2 training (ModelParallelStrategy(data_parallel_size=N, "
                     "tensor_parallel_size=1) with fully_shard in configure_model)") if fsdp2 \
            else "single-device and DDP training"
        raise RuntimeError(f"{technique} supports {supported}; {type(trainer.strategy).__name__} shards or wraps "
                           f"parameters{' in a way it does not handle' if fsdp2 else ''}, so {reason}")


def reduced_across_ranks(trainer: Optional["pl.Trainer"], tensor: Tensor, op: str = "sum") -> Tensor:
    """A copy of ``tensor`` (this rank's records of the planned epoch) reduced over every rank with
    ``op`` (``"sum"`` or ``"max"``), on the CPU; ``tensor`` itself is left alone. Every rank must call it."""
    copy = tensor.detach().clone()
    if trainer is not None and trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        copy = copy.to(trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu"))
        dist.all_reduce(copy, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return copy.cpu()


def gather_samples(trainer: "pl.Trainer", values: Tensor) -> tuple[Tensor, int]:
    """All ranks' 1-D ``values`` concatenated in global-rank order, and where this rank's begin.

    Ranks may hold different numbers of samples. Without a process group this is ``values``, 0.
    """
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return values, 0
    parts = all_gather_uneven(values.contiguous())
    offset = sum(p.numel() for p in parts[: trainer.global_rank])
    return torch.cat(parts), offset
