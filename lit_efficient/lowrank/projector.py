"""Low-rank projections of a weight gradient: which side, which basis, and the two maps.

A gradient ``G`` (m×n) is projected to ``R`` with a basis of rank r:

* ``right``: ``Q`` (r×n), ``R = G Qᵀ`` (m×r), back: ``R Q``;
* ``left``: ``P`` (m×r), ``R = Pᵀ G`` (r×n), back: ``P R``;
* ``full``: both, ``R = Pᵀ G Qᵀ`` (r×r), back: ``P R Q``.

``proj_type`` picks the side: ``std`` projects the longer dimension away (right if m ≥ n, the
GaLore default: the state is ``r·max(m, n)`` per moment), ``reverse_std`` the other, ``left``,
``right`` and ``full`` as named. Bases come from an SVD of ``G`` in fp32 (``svd``), from a
seeded sketch of ``GᵀG`` (``randomized_svd``: cheaper, and shardable by rows), or are random Gaussian
matrices regenerated from a seed (``random``: nothing stored, APOLLO-style, see ``optim.py``).

Under FSDP2 a gradient arrives as this rank's rows; :func:`sharded_svd_bases` computes the same
basis one process would from them (``Q`` whole on every rank, ``P`` as this rank's rows), without
every rank receiving the whole gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from lit_efficient.core.gradient_travel import project, project_back  # noqa: F401  (the maps: shared with DDP)
from lit_efficient.core.shards import Span

ProjType = Literal["std", "reverse_std", "left", "right", "full"]
Projection = Literal["svd", "randomized_svd", "random"]
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")
PROJECTIONS: tuple[str, ...] = ("svd", "randomized_svd", "random")


def projection_side(shape: tuple[int, int], proj_type: ProjType) -> str:
    """``"left"``, ``"right"`` or ``"full"`` for a matrix of ``shape`` under ``proj_type``."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"`proj_type` must be one of {list(PROJ_TYPES)}; got {proj_type!r}")


def projected_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return {"right": (m, rank), "left": (rank, n), "full": (rank, rank)}[side]


def basis_numel(shape: tuple[int, int], rank: int, side: str) -> int:
    """Elements of the stored basis (0 for the random projection, which is regenerated)."""
    m, n = shape
    return {"right": rank * n, "left": m * rank, "full": m * rank + rank * n}[side]


def svd_bases(grad: Tensor, rank: int, side: str, method: Projection,
              seed: int = 0) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(P, Q) from the top-``rank`` singular vectors of ``grad`` (computed in fp32); None where unused.

    ``svd``: a one-sided basis on the smaller dimension comes from the eigenvectors of the fp32 Gram
    matrix (``G Gᵀ`` or ``Gᵀ G``), at 0.43× a full SVD's time; it keeps as much of the gradient's
    energy as the exact basis, but squaring the spectrum blurs nearly equal singular values at the
    rank boundary (``benchmarks/galore_refresh.py``); anything else comes from the SVD. ``randomized_svd`` sketches
    (:func:`sketched_row_basis`) from ``seed``, not the global generator: every rank, and a resumed
    run, sketch alike.
    """
    g = grad.detach().float()
    m, n = g.shape
    if method == "randomized_svd":
        p, q = sketched_bases(g, rank, side, seed)
    elif side == "left" and m <= n:
        _, vectors = torch.linalg.eigh(g @ g.T)  # ascending eigenvalues: the last columns are the top ones
        p, q = vectors[:, -rank:].flip(1).contiguous(), None
    elif side == "right" and n <= m:
        _, vectors = torch.linalg.eigh(g.T @ g)
        p, q = None, vectors[:, -rank:].flip(1).T.contiguous()
    else:
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        p = u[:, :rank].contiguous() if side in ("left", "full") else None
        q = vh[:rank].contiguous() if side in ("right", "full") else None
    if not all(b is None or bool(torch.isfinite(b).all()) for b in (p, q)):
        raise torch.linalg.LinAlgError("non-finite singular vectors")
    return p, q


def sharded_svd_bases(grad: Tensor, rank: int, side: str, method: Projection, shards: Span,
                      seed: int = 0, root: int = 0) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """:func:`svd_bases` of a matrix whose rows are split over ranks (FSDP2), from ``grad``, this rank's
    rows (``shards`` says which): the same decomposition one process makes of the whole matrix, so
    ``Q`` (r×n) comes back whole, identical on every rank, and ``P`` (m×r) as this rank's rows. No
    rank receives the whole gradient except, where an exact decomposition needs every row at once,
    the one rank (``root``) that makes it for all.

    Communication per refresh, by what one process would compute:

    * right side, ``svd`` with n ≤ m: the Gram matrix ``GᵀG = Σ_k G_kᵀG_k`` is a sum over row blocks:
      one all-reduce of n×n;
    * ``randomized_svd``, right or left: every product of the sketch with ``G`` is either a sum over
      row blocks or made row by row (:func:`sketched_row_basis`, :func:`sketched_column_basis`):
      a few all-reduces of n×(r+8) (the left side adds all-gathers of the thin m×(r+8) sketch);
    * anything else (the left side's ``svd``, ``full``, the right side of a wide matrix): the
      eigenvectors of ``G Gᵀ`` need every pair of rows, so rank ``root`` gathers the gradient
      (m×n, received by that rank only), decomposes it and broadcasts the basis (m×r and/or r×n);
      the caller spreads ``root`` over the matrices. A failed decomposition broadcasts NaNs, so
      every rank raises together.

    Every rank must call it for the same matrices, in the same order.
    """
    g = grad.detach().float()
    n = g.shape[1]
    if side == "right" and method == "svd" and n <= shards.rows:
        _, vectors = torch.linalg.eigh(shards.all_reduce(g.T @ g))  # ascending: the last columns are the top ones
        p, q = None, vectors[:, -rank:].flip(1).T.contiguous()
    elif side == "right" and method == "randomized_svd":
        p, q = None, sketched_row_basis(g, rank, seed, reduce=shards.all_reduce)
    elif side == "left" and method == "randomized_svd":
        p, q = sketched_column_basis(g, rank, seed, shards), None
    else:
        p, q = decomposed_on_one_rank(g, rank, side, method, shards, seed, root)
    if not all(b is None or bool(torch.isfinite(b).all()) for b in (p, q)):
        raise torch.linalg.LinAlgError("non-finite singular vectors")
    return p, q


def decomposed_on_one_rank(g: Tensor, rank: int, side: str, method: Projection, shards: Span, seed: int,
                           root: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """:func:`svd_bases` of the whole matrix made by rank ``root`` from the gathered rows and
    broadcast: ``P`` as this rank's rows, ``Q`` whole; NaN everywhere when ``root``'s decomposition failed."""
    whole = shards.gather_on(g, root)
    p = g.new_empty(shards.rows, rank) if side in ("left", "full") else None
    q = g.new_empty(rank, g.shape[1]) if side in ("right", "full") else None
    if whole is not None:
        try:
            made = svd_bases(whole, rank, side, method, seed)
        except (torch.linalg.LinAlgError, RuntimeError):
            made = (None, None)
        for basis, value in zip((p, q), made):
            if basis is not None:
                basis.copy_(value) if value is not None else basis.fill_(math.nan)
    for basis in (p, q):
        if basis is not None:
            shards.broadcast(basis, root)
    return (None if p is None else shards.take(p).contiguous()), q


def sketched_bases(g: Tensor, rank: int, side: str, seed: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(P, Q) of ``side`` by the sketched range finder: a left basis is the row basis of ``Gᵀ``;
    ``full`` finishes the row basis ``Q`` with the small SVD of ``G Qᵀ`` (m×r), which gives both sides."""
    if side == "left":
        return sketched_row_basis(g.T, rank, seed).T.contiguous(), None
    q = sketched_row_basis(g, rank, seed)
    if side == "right":
        return None, q
    u, _, vh = torch.linalg.svd(g @ q.T, full_matrices=False)
    return u.contiguous(), (vh @ q).contiguous()


def sketched_row_basis(grad: Tensor, rank: int, seed: int, oversample: int = 8, power_iterations: int = 2,
                       reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Q (r×n), the top-``rank`` right singular vectors of ``grad`` (m×n) by a randomized range finder
    on the Gram operator ``GᵀG``, touching ``G`` only through products with thin matrices:

    1. ``Y = GᵀG·Ω`` for a Gaussian ``Ω`` (n×(r+p)) drawn from ``seed``;
    2. ``power_iterations`` times: orthonormalise ``Y``, then ``Y = GᵀG·Y`` (each sharpens the
       spectrum by its square);
    3. orthonormalise ``Y`` and solve the small eigenproblem of ``YᵀGᵀG·Y`` ((r+p)×(r+p)): its top
       ``rank`` eigenvectors, mapped back by ``Y``, are the basis, in descending order.

    Every product with ``G`` has the form ``Gᵀ(G·X)``, a sum over the rows of ``G``: with ``G`` split
    by rows (a sharded weight's local gradient), ``reduce`` (e.g. an all-reduce sum) completes each one
    from the local parts, n×(r+p) numbers per product, and ranks that share ``seed`` end with the same
    basis; ``None`` means ``grad`` is whole.
    """
    g = grad.detach().float()
    n = g.shape[1]
    width = min(rank + oversample, n)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sketch = torch.randn(n, width, generator=generator).to(g.device)
    total = reduce or (lambda t: t)

    def gram_times(x: Tensor) -> Tensor:
        return total(g.T @ (g @ x))

    y = gram_times(sketch)
    for _ in range(power_iterations):
        y = gram_times(torch.linalg.qr(y)[0])
    y = torch.linalg.qr(y)[0]
    gy = g @ y
    small = total(gy.T @ gy)
    _, vectors = torch.linalg.eigh(small)  # ascending: the last columns are the top ones
    return (y @ vectors[:, -rank:].flip(1)).T.contiguous()


def sketched_column_basis(grad: Tensor, rank: int, seed: int, shards: Span, oversample: int = 8,
                          power_iterations: int = 2) -> Tensor:
    """This rank's rows of P (m×r), the top-``rank`` left singular vectors of a matrix split by rows,
    from ``grad``, its local rows: :func:`sketched_row_basis` of ``Gᵀ`` (the same sketch, drawn whole
    from ``seed``, and the same steps), with every product formed where the rows are. ``Gᵀ·X`` is a
    sum over row blocks (an all-reduce of n×(r+p)), ``G·Z`` is made row by row, and each
    orthonormalisation runs on the thin m×(r+p) sketch, all-gathered, as one process runs it."""
    g = grad.detach().float()
    width = min(rank + oversample, shards.rows)
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    sketch = shards.take(torch.randn(shards.rows, width, generator=generator).to(g.device))

    def gram_times(x: Tensor) -> Tensor:  # this rank's rows of G Gᵀ X from its rows of X
        return g @ shards.all_reduce(g.T @ x)

    y = gram_times(sketch)
    for _ in range(power_iterations):
        y = gram_times(shards.take(torch.linalg.qr(shards.gather(y))[0]))
    y = torch.linalg.qr(shards.gather(y))[0]
    gy = shards.all_reduce(g.T @ shards.take(y))
    _, vectors = torch.linalg.eigh(gy.T @ gy)  # ascending: the last columns are the top ones
    return shards.take(y @ vectors[:, -rank:].flip(1)).contiguous()


def random_bases(shape: tuple[int, int], rank: int, side: str, seed: int,
                 device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Gaussian (P, Q) with entries N(0, 1/r), identical wherever ``seed`` is (all DDP ranks)."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    m, n = shape
    scale = 1.0 / math.sqrt(rank)
    p = torch.randn(m, rank, generator=generator).mul_(scale).to(device) if side in ("left", "full") else None
    q = torch.randn(rank, n, generator=generator).mul_(scale).to(device) if side in ("right", "full") else None
    return p, q


def subspace_overlap(old: Tensor, new: Tensor, rows: bool,
                     reduce: Optional[Callable[[Tensor], Tensor]] = None) -> float:
    """How much of the old subspace the new basis keeps, in [0, 1]: ‖old·newᵀ‖²_F / r for row
    bases (Q, r×n), ‖oldᵀ·new‖²_F / r for column bases (P, m×r) — the mean squared cosine of the
    principal angles when both bases are orthonormal. Column bases given as this rank's rows
    (FSDP2) need ``reduce`` (an all-reduce sum) to complete ``oldᵀ·new``."""
    overlap = old @ new.T if rows else old.T @ new
    if reduce is not None and not rows:
        overlap = reduce(overlap)
    return float((overlap.float() ** 2).sum() / max(1, min(old.shape)))


__all__ = ["PROJECTIONS", "PROJ_TYPES", "basis_numel", "project", "project_back", "projected_shape",
           "projection_side", "random_bases", "sharded_svd_bases", "sketched_column_basis", "sketched_row_basis",
           "subspace_overlap", "svd_bases"]
