"""Deciding from tensors split across ranks as if they were whole.

Under FSDP2 a weight (and its gradient, and every optimizer-state tensor shaped like it) is a
DTensor sharded on dim 0: each rank holds a run of whole rows, in rank order, so its part is one
contiguous run of the flattened tensor. :class:`Span` says where. Counts over shards are one
all-reduce for any number of tensors (:func:`counts`), and :func:`largest` picks the k largest
entries of values spread over ranks exactly as one process would pick them from the whole,
without gathering the whole: each rank offers its own best k, every rank merges the offers.

Ties are broken by position (the lower flat index wins), here and in one process alike, so the
choice does not depend on how a tensor is split. Without a process group (one process, DDP) every
function works on the whole tensor and communicates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from lit_efficient.core.distributed import local_part


@dataclass(frozen=True)
class Span:
    """Where this rank's part of a tensor lies in the whole.

    Attributes:
        shape: the whole tensor's shape.
        start: flat (row-major) index of this rank's first entry.
        numel: number of entries this rank holds (0 is possible: more ranks than rows).
        group: the process group the other parts are on; None when the tensor is whole here.
    """

    shape: tuple[int, ...]
    start: int
    numel: int
    group: Optional[dist.ProcessGroup] = None

    @staticmethod
    def of(tensor: Tensor) -> "Span":
        """The span of ``tensor``: a DTensor sharded on dim 0 of a 1-D mesh (FSDP2's layout, rows
        split as ``torch.chunk`` splits them), or a whole tensor. Other layouts are refused."""
        shape = tuple(tensor.shape)
        local, group = local_part(tensor)
        if group is None:
            return Span(shape, 0, tensor.numel())
        placements = tensor.placements  # type: ignore[union-attr]
        if len(placements) != 1 or placements[0] != Shard(0):
            raise ValueError(f"a tensor sharded as {placements} is not supported (only FSDP2's Shard(0))")
        ranks, rank = dist.get_world_size(group), dist.get_rank(group)
        rows_per_rank = math.ceil(shape[0] / ranks) if shape[0] else 0
        first = min(rank * rows_per_rank, shape[0])
        rows = max(0, min(rows_per_rank, shape[0] - first))
        row_numel = math.prod(shape[1:])
        if local.shape[0] != rows:
            raise ValueError(f"rank {rank} holds {local.shape[0]} rows of a {shape} tensor; torch.chunk gives it "
                             f"{rows}: a sharding this module does not know")
        return Span(shape, first * row_numel, rows * row_numel, group)

    @property
    def whole(self) -> int:
        return math.prod(self.shape)

    def take(self, full: Tensor) -> Tensor:
        """This rank's part of ``full`` (a tensor of the whole shape, the same on every rank)."""
        if self.group is None:
            return full
        return full.reshape(-1)[self.start: self.start + self.numel].reshape(-1, *self.shape[1:])

    def gather(self, part: Tensor) -> Tensor:
        """The whole tensor from every rank's ``part`` (one all-gather; every rank of the group calls it).
        For state that must be saved whole, e.g. in a callback's checkpoint entry, which one rank writes."""
        if self.group is None:
            return part
        ranks, rows = dist.get_world_size(self.group), self.shape[0]
        rows_per_rank = math.ceil(rows / ranks)
        padded = part.new_zeros((rows_per_rank, *self.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:rows]

    def positions(self, device: torch.device) -> Tensor:
        """Flat indices in the whole tensor of this rank's entries."""
        return torch.arange(self.start, self.start + self.numel, device=device)


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (the tensor itself when it is whole)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def counts(flags: Sequence[Tensor], group: Optional[dist.ProcessGroup]) -> list[int]:
    """The number of True entries of each tensor (a rank's parts), summed over ``group``: one
    all-reduce and one device-to-host sync for all of them."""
    if not flags:
        return []
    sums = torch.stack([f.sum() for f in flags])
    if group is not None:
        dist.all_reduce(sums, group=group)
    return [int(n) for n in sums.tolist()]


def _largest_here(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest of 1-D ``values``, ties to the lower index (k < numel)."""
    kth = torch.topk(values, k, sorted=False).values.min()
    above = (values > kth).nonzero().flatten()
    ties = (values == kth).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties])


def largest(values: Tensor, k: int, positions: Optional[Tensor] = None, group: Optional[dist.ProcessGroup] = None,
            total: Optional[int] = None) -> Tensor:
    """Which of 1-D ``values`` are among the ``k`` largest over every rank of ``group`` (a bool
    tensor like ``values``); ties go to the lower ``positions`` (each rank's, increasing, distinct
    across ranks: e.g. flat indices in the whole tensor).

    Each rank sends at most ``min(k, total - k)`` (value, position) pairs: when more than half of
    the ``total`` values (counted over ranks if not given) are chosen, the complement is found
    instead. Without a group the choice is local and nothing is sent. Every rank of ``group`` must
    call it with the same ``k``.
    """
    n = values.numel()
    if group is None:
        chosen = torch.zeros(n, dtype=torch.bool, device=values.device)
        if k >= n:
            chosen[:] = True
        elif k > 0:
            chosen[_largest_here(values.float(), k)] = True
        return chosen
    assert positions is not None, "positions are needed to merge across ranks"
    if total is None:
        total = counts([torch.ones(n, dtype=torch.bool, device=values.device)], group)[0]
    k = max(0, min(k, total))
    if 2 * k > total:  # the complement: the total - k smallest, ties to the higher position
        return ~largest(-values.flip(0), total - k, -positions.flip(0), group, total).flip(0)
    chosen = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k == 0:
        return chosen
    offered = _largest_here(values.float(), k) if k < n else torch.arange(n, device=values.device)
    sent_values = torch.full((k,), -math.inf, device=values.device)
    sent_positions = torch.full((k,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=values.device)
    sent_values[: offered.numel()] = values[offered].float()  # padding: -inf at the last position, never chosen
    sent_positions[: offered.numel()] = positions[offered]
    ranks = dist.get_world_size(group)
    all_values = [torch.empty_like(sent_values) for _ in range(ranks)]
    all_positions = [torch.empty_like(sent_positions) for _ in range(ranks)]
    dist.all_gather(all_values, sent_values, group=group)
    dist.all_gather(all_positions, sent_positions, group=group)
    merged_positions, order = torch.sort(torch.cat(all_positions), stable=True)
    winners = merged_positions[_largest_here(torch.cat(all_values)[order], k)]
    chosen[offered] = torch.isin(positions[offered], winners)
    return chosen


__all__ = ["Span", "counts", "largest", "local"]
