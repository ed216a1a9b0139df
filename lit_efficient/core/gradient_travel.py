"""What of a gradient must travel between data-parallel ranks for the coming optimizer step.

Under DDP every rank all-reduces whole gradients, although some techniques read only part of one:

* GaLore, between basis refreshes, reads only the projection of a matrix's gradient onto its
  orthonormal bases (``R = Pᵀ G Qᵀ``, a side left out where the matrix is not projected there);
* sparse training (GraNet, RigL, SET, SparCL), between the steps that regrow by gradient, keeps
  only the gradient's entries at the mask's active positions.

Both parts are linear in the gradient and equal on every rank (bases and masks are), so all-reducing
each rank's part gives exactly the part of the all-reduced gradient: no approximation, no error
feedback. A technique says what it reads through
:class:`lit_efficient.core.protocols.ReadsPartOfGradients`; a strategy
(:class:`lit_efficient.strategies.ExactCompressionDDPStrategy`) packs the parts, all-reduces them
and writes each gradient back as its part (the projection mapped back, the kept entries with zeros
elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def project(grad: Tensor, p: Optional[Tensor], q: Optional[Tensor]) -> Tensor:
    """``Pᵀ G Qᵀ``, each side only where its basis is given (``P`` m×r, ``Q`` r×n)."""
    out = grad
    if p is not None:
        out = p.T @ out
    if q is not None:
        out = out @ q.T
    return out


def project_back(low: Tensor, p: Optional[Tensor], q: Optional[Tensor]) -> Tensor:
    """``P R Q``: a projected gradient mapped back to the matrix's shape."""
    out = low
    if p is not None:
        out = p @ out
    if q is not None:
        out = out @ q
    return out


@dataclass(frozen=True)
class Projection:
    """The step reads only ``Pᵀ G Qᵀ`` of the gradient ``G`` (m×n); ``left`` (``P``, m×r) and
    ``right`` (``Q``, r×n) have orthonormal columns and rows, so the gradient written back, ``P R Q``,
    projects to the same ``R`` again."""

    left: Optional[Tensor]
    right: Optional[Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return self.left.dtype if self.left is not None else self.right.dtype

    def low_shape(self, shape: Sequence[int]) -> tuple[int, int]:
        """The shape of ``R`` for a gradient of ``shape``."""
        m, n = shape
        return (self.left.shape[1] if self.left is not None else m, self.right.shape[0] if self.right is not None
                else n)

    def numel(self, shape: Sequence[int]) -> int:
        rows, cols = self.low_shape(shape)
        return rows * cols

    def pack(self, grad: Tensor) -> Tensor:
        return project(grad.to(self.dtype), self.left, self.right).reshape(-1).to(grad.dtype)

    def unpack(self, values: Tensor, grad: Tensor) -> None:
        low = values.to(self.dtype).view(self.low_shape(grad.shape))
        if grad.dtype == self.dtype and (self.left is None) != (self.right is None):  # one side: straight into grad
            torch.mm(*((self.left, low) if self.left is not None else (low, self.right)), out=grad)
        else:
            grad.copy_(project_back(low, self.left, self.right))


@dataclass(frozen=True)
class KeptEntries:
    """The step reads only the gradient's entries at ``indices`` (int64, into the flattened
    gradient, the same on every rank); the others are written back as zeros."""

    indices: Tensor

    def numel(self, shape: Sequence[int]) -> int:
        return int(self.indices.numel())

    def pack(self, grad: Tensor) -> Tensor:
        return grad.reshape(-1).index_select(0, self.indices)

    def unpack(self, values: Tensor, grad: Tensor) -> None:
        flat = grad.view(-1)
        flat.zero_()
        flat.index_copy_(0, self.indices, values)


# None: the whole gradient travels (a step that reads all of it: a basis refresh, growth by gradient)
Part = Union[Projection, KeptEntries, None]


def kept_indices(mask: Tensor) -> Tensor:
    """The flat positions of ``mask``'s True entries (one device sync: compute once per mask change)."""
    return torch.nonzero(mask.reshape(-1), as_tuple=False).squeeze(1)


def merge_parts(claims: Sequence[tuple[str, Tensor, Part]]) -> dict[int, tuple[str, Part]]:
    """One part per parameter (keyed by ``id``) from every technique's ``(technique, parameter, part)``:
    where two techniques read the same gradient, the one that needs it whole wins, and two different
    parts make it travel whole too (each technique must see what it reads)."""
    merged: dict[int, tuple[str, Part]] = {}
    for technique, param, part in claims:
        key = id(param)
        if key not in merged:
            merged[key] = (technique, part)
            continue
        other, before = merged[key]
        if before is None or part is None or before is not part:
            names = other if other == technique else f"{other}+{technique}"
            merged[key] = (names, None)
    return merged


__all__ = ["KeptEntries", "Part", "Projection", "kept_indices", "merge_parts", "project", "project_back"]
