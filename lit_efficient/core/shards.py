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
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lit_efficient.core.distributed import local_part


@dataclass(frozen=True)
class Span:
    """Where this rank's rows of a tensor lie in the whole, and the collectives that complete what
    each rank computes from its rows.

    Attributes:
        shape: the whole tensor's shape.
        first_row: this rank's first row.
        local_rows: rows this rank holds (0 is possible: more ranks than rows).
        rows_per_rank: rows of the first ranks (``ceil(rows / ranks)``, torch.chunk's split).
        group: the process group the other rows are on; None when the tensor is whole here.
        mesh: the device mesh of that group (to build DTensors); None when whole.
    """

    shape: tuple[int, ...]
    first_row: int
    local_rows: int
    rows_per_rank: int
    group: Optional[dist.ProcessGroup] = None
    mesh: Optional[DeviceMesh] = None

    @staticmethod
    def whole_tensor(shape: Sequence[int]) -> "Span":
        """The span of a tensor held whole on this rank."""
        rows = shape[0] if len(shape) else 1
        return Span(tuple(shape), 0, rows, rows)

    @staticmethod
    def of(tensor: Tensor) -> "Span":
        """The span of ``tensor``: a DTensor sharded on dim 0 of a 1-D mesh (FSDP2's layout, rows
        split as ``torch.chunk`` splits them), or a whole tensor. Other layouts are refused."""
        local, group = local_part(tensor)
        if group is None:
            return Span.whole_tensor(tensor.shape)
        shape, mesh = tuple(tensor.shape), tensor.device_mesh  # type: ignore[union-attr]
        placements = tuple(tensor.placements)  # type: ignore[union-attr]
        if mesh.ndim != 1 or placements != (Shard(0),):
            raise ValueError(f"a tensor sharded as {placements} on a {mesh.ndim}-D mesh is not supported (only "
                             "FSDP2's Shard(0) on one mesh dimension)")
        span = Span.chunked(shape, mesh.size(), mesh.get_local_rank(), group, mesh)
        if local.shape[0] != span.local_rows:
            raise ValueError(f"rank {mesh.get_local_rank()} holds {local.shape[0]} rows of a {shape} tensor; "
                             f"torch.chunk gives it {span.local_rows}: a sharding this module does not know")
        return span

    @staticmethod
    def chunked(shape: Sequence[int], ranks: int, rank: int, group: Optional[dist.ProcessGroup] = None,
                mesh: Optional[DeviceMesh] = None) -> "Span":
        """Rank ``rank``'s rows of a tensor of ``shape`` whose rows ``torch.chunk`` splits over ``ranks``
        (FSDP2's split: ceil(rows/ranks) each, the last ranks fewer or none)."""
        shape = tuple(shape)
        rows_per_rank = math.ceil(shape[0] / ranks) if shape[0] else 0
        first = min(rank * rows_per_rank, shape[0])
        return Span(shape, first, max(0, min(rows_per_rank, shape[0] - first)), rows_per_rank, group, mesh)

    def split_as(self, shape: Sequence[int]) -> "Span":
        """This rank's span of another tensor, of ``shape``, split by rows over the same ranks (state
        this module shards itself, e.g. low-rank moments); a whole span for a whole one."""
        if self.group is None:
            return Span.whole_tensor(shape)
        return Span.chunked(shape, self.world_size, dist.get_rank(self.group), self.group, self.mesh)

    @property
    def sharded(self) -> bool:
        return self.group is not None

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def whole(self) -> int:
        """Entries of the whole tensor."""
        return math.prod(self.shape)

    @property
    def start(self) -> int:
        """Flat (row-major) index of this rank's first entry."""
        return self.first_row * math.prod(self.shape[1:])

    @property
    def numel(self) -> int:
        """Entries this rank holds."""
        return self.local_rows * math.prod(self.shape[1:])

    def take(self, full: Tensor) -> Tensor:
        """This rank's rows of ``full``, a tensor with the whole tensor's rows that every rank holds
        entire (its other dimensions may differ: a basis of the rows, say)."""
        if self.group is None:
            return full
        return full[self.first_row: self.first_row + self.local_rows]

    def gather(self, part: Tensor) -> Tensor:
        """The whole tensor from every rank's rows ``part`` (one all-gather; every rank of the group
        calls it). For state saved whole (a callback's checkpoint entry, which one rank writes) or a
        decomposition every rank repeats."""
        if self.group is None:
            return part
        ranks = self.world_size
        padded = part.new_zeros((self.rows_per_rank, *part.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.rows]

    def gather_on(self, part: Tensor, root: int) -> Optional[Tensor]:
        """The whole tensor on rank ``root`` of the group (None on the others) from every rank's rows
        ``part``: one gather, (ranks - 1)/ranks of the whole received by one rank instead of by every
        rank, for work one rank does for all (a decomposition it then broadcasts)."""
        if self.group is None:
            return part
        padded = part.new_zeros((self.rows_per_rank, *part.shape[1:]))
        padded[: part.shape[0]] = part
        here = dist.get_rank(self.group) == root
        parts = [torch.empty_like(padded) for _ in range(self.world_size)] if here else None
        dist.gather(padded, parts, dst=dist.get_global_rank(self.group, root), group=self.group)
        return torch.cat(parts)[: self.rows] if here else None

    def broadcast(self, tensor: Tensor, root: int) -> Tensor:
        """``tensor`` as rank ``root`` of the group holds it, on every rank (in place)."""
        if self.group is not None:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, root), group=self.group)
        return tensor

    def reduce_scatter(self, tensor: Tensor) -> Tensor:
        """This rank's rows of ``tensor`` (whole-shaped, a partial sum on each rank) summed over the
        ranks: one reduce-scatter, half an all-reduce's traffic, when each rank needs only its rows."""
        if self.group is None:
            return tensor
        padded = tensor.new_zeros((self.rows_per_rank * self.world_size, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        out = tensor.new_empty((self.rows_per_rank, *tensor.shape[1:]))
        dist.reduce_scatter_single(out, padded, group=self.group)
        return out[: self.local_rows]

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the ranks, in place: a sum over rows completed from each rank's rows."""
        if self.group is not None:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def as_dtensor(self, part: Tensor) -> Tensor:
        """This rank's rows ``part`` as the DTensor of the whole (``Shard(0)``, any trailing shape): how
        row-split state is stored for torch's distributed checkpoints, which save a plain tensor from
        one rank only. A whole tensor stays as it is."""
        if self.mesh is None:
            return part
        part = part.contiguous()
        shape = torch.Size((self.rows, *part.shape[1:]))
        return DTensor.from_local(part, self.mesh, [Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def positions(self, device: torch.device) -> Tensor:
        """Flat indices in the whole tensor of this rank's entries."""
        return torch.arange(self.start, self.start + self.numel, device=device)


def row_shards(tensor: Tensor) -> Optional[Span]:
    """The span of ``tensor`` when it is sharded (FSDP2), else None."""
    span = Span.of(tensor)
    return span if span.sharded else None


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (the tensor itself when it is whole)."""
    return local_part(tensor)[0]


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


__all__ = ["Span", "counts", "largest", "local", "row_shards"]
