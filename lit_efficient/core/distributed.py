"""Across ranks: which strategies a technique supports, and the collectives techniques share.

Lightning's strategies are the distributed engine; these helpers only gather or reduce what a
technique decides from, so that every rank decides alike.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

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


def shards_parameters(trainer) -> bool:
    """Whether the strategy is FSDP2 (ModelParallelStrategy): parameters are DTensor shards, and a
    sharded module's forward is a collective (it all-gathers), so ranks must run the same modules."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def on_every_rank(trainer) -> Callable[[bool], bool]:
    """A function of a local flag: whether it holds on every rank (one all-reduce per call)."""
    def agree(flag: bool) -> bool:
        value = torch.tensor(int(flag), device=trainer.strategy.root_device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value)
    return agree


def local_part(tensor: Tensor) -> tuple[Tensor, Optional[dist.ProcessGroup]]:
    """(the part of ``tensor`` this rank holds, the group its other parts are spread over): a
    dim-sharded DTensor (FSDP2's parameters and gradients) gives its local shard and its mesh's group;
    anything else is whole here (group None)."""
    if isinstance(tensor, DTensor):
        if any(isinstance(placement, Shard) for placement in tensor.placements):
            return tensor.to_local(), tensor.device_mesh.get_group()
        return tensor.to_local(), None
    return tensor, None


def local_bytes(tensor: Tensor) -> int:
    """Bytes of ``tensor`` held on this rank (a shard's, under FSDP2)."""
    local = local_part(tensor)[0]
    return local.numel() * local.element_size()


def squared_sums(groups: Sequence[Sequence[Tensor]], device: torch.device) -> Tensor:
    """One fp32 number per group of tensors: the sum of their squared entries, over whole tensors even
    where they are FSDP2 shards (the shards' sums are all-reduced together, one collective per call;
    an unsharded tensor counts once). Every rank must call it alike."""
    shards = torch.zeros(len(groups), device=device)
    whole = torch.zeros(len(groups), device=device)
    group_of_shards = None
    for i, tensors in enumerate(groups):
        for tensor in tensors:
            local, group = local_part(tensor)
            value = local.detach().float().pow(2).sum()
            if group is None:
                whole[i] += value
            else:
                shards[i] += value
                group_of_shards = group
    if group_of_shards is not None:
        dist.all_reduce(shards, group=group_of_shards)
    return shards + whole


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
