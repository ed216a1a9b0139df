"""GaLoreAdamW: AdamW whose moments live in a low-rank projection of each weight gradient.

Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
ICML 2024, https://arxiv.org/abs/2403.03507. Variants: APOLLO (Zhu et al., arXiv 2412.05270:
random projection + channel-wise scaling of the raw gradient) and Fira (Chen et al., arXiv
2410.01623: the out-of-subspace residual added back, scaled, with a norm-growth limiter).

A plain ``torch.optim.Optimizer``, usable without Lightning. Parameter groups that carry a
``rank`` are projected; the others (and any parameter that is not 2-D) get plain AdamW::

    optimizer = GaLoreAdamW([
        {"params": matrices, "rank": 64, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"},
        {"params": everything_else},
    ], lr=1e-3, weight_decay=0.1)

For a projected matrix W (m×n) with gradient G: every ``update_proj_gap`` steps (and at the first)
a rank-r basis of G is computed in fp32 (see ``projector.py``); the Adam moments are kept for the
projected gradient R only, and the update ``W ← W − lr·scale·back(N)`` uses the Adam direction N
of R mapped back. Decoupled weight decay is applied at full rank, before the update, as in
``torch.optim.AdamW``. A failed SVD keeps the previous basis (and warns). The state holds tensors
and ints only, so ``torch.load(weights_only=True)`` reads checkpoints and a resume keeps the same
subspace. With ``eight_bit=True`` the moments are stored blockwise-quantized to 8 bits
(bitsandbytes' dynamic maps, on CPU too).

Under FSDP2 a parameter and its gradient are DTensors split on dim 0; each rank steps its rows and
keeps its rows of whatever state is split like them (see "the state under FSDP2" below and
``GaLoreAdamW._galore_update``); the results are one process's up to float rounding.

Layout: constants and group validation; the 8-bit codec; one small function per variant concern
(moments in fp32 or 8 bits, the Adam direction, the basis per projection kind, the update mapped
back per variant: GaLore, APOLLO, Fira's residual); the optimizer class, which only dispatches
between them and keeps the bookkeeping; memory accounting.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from typing import Any, Callable, Literal, Optional

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from lit_efficient.core.checks import check_int
from lit_efficient.core.device import synchronize
from lit_efficient.core.distributed import local_bytes, local_part
from lit_efficient.core.gradient_travel import Part, Projection
from lit_efficient.core.shards import Span, local, row_shards
from lit_efficient.lowrank.projector import (
    PROJ_TYPES,
    PROJECTIONS,
    basis_numel,
    project,
    project_back,
    projected_shape,
    projection_side,
    random_bases,
    sharded_svd_bases,
    subspace_overlap,
    svd_bases,
)

Bases = tuple[Optional[Tensor], Optional[Tensor]]  # (P, Q); None on a side that is not projected

MomentsOnRefresh = Literal["align", "rotate", "keep"]
MOMENTS_ON_REFRESH: tuple[str, ...] = ("align", "rotate", "keep")
GALORE_DEFAULTS = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "projection": "svd", "fira": False,
                   "eight_bit": False, "seed": 0, "moments_on_refresh": "rotate", "shard_basis": False}
BLOCK = 256  # elements per 8-bit quantization block (bitsandbytes' optimizers use 256 too)
FIRA_GROWTH = 1.01  # Fira's limiter: the residual's norm may grow at most 1% per step
_CODES: dict[tuple[bool, str], Tensor] = {}


def check_galore_group(group: dict[str, Any]) -> None:
    """Raise a ValueError naming the bad key of a projected parameter group."""
    rank = check_int(group["rank"], "rank", 1)
    check_int(group["update_proj_gap"], "update_proj_gap", 1)  # optimizer steps
    if group["proj_type"] not in PROJ_TYPES:
        raise ValueError(f"`proj_type` must be one of {list(PROJ_TYPES)}; got {group['proj_type']!r}")
    if group["projection"] not in PROJECTIONS:
        raise ValueError(f"`projection` must be one of {list(PROJECTIONS)}; got {group['projection']!r}")
    if group.get("moments_on_refresh", GALORE_DEFAULTS["moments_on_refresh"]) not in MOMENTS_ON_REFRESH:
        raise ValueError(f"`moments_on_refresh` must be one of {list(MOMENTS_ON_REFRESH)}; "
                         f"got {group['moments_on_refresh']!r}")
    if not isinstance(group.get("shard_basis", False), bool):
        raise ValueError(f"`shard_basis` must be a bool; got {group['shard_basis']!r}")
    if not isinstance(group["scale"], (int, float)) or isinstance(group["scale"], bool) or not group["scale"] > 0:
        raise ValueError(f"`scale` must be a positive number; got {group['scale']!r}")
    projected = group.get("projected")
    if projected is not None and len(projected) != len(group["params"]):
        raise ValueError("`projected` must hold one bool per parameter of its group")
    for i, p in enumerate(group["params"]):
        if (projected is None or projected[i]) and p.dim() == 2 and rank > min(p.shape):
            raise ValueError(f"`rank`={rank} is larger than a {tuple(p.shape)} matrix allows (at most {min(p.shape)})")


# -- 8-bit codec -----------------------------------------------------------------------------------


def _code(signed: bool, device: torch.device) -> Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        import bitsandbytes.functional as bnbf

        _CODES[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize_8bit(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """(uint8 codes, per-block absmax) of ``values`` with bitsandbytes' blockwise dynamic quantization."""
    import bitsandbytes.functional as bnbf

    if values.numel() == 0:  # an FSDP2 rank may hold no rows of a matrix
        return torch.zeros(values.shape, dtype=torch.uint8, device=values.device), values.new_zeros(0)
    codes, state = bnbf.quantize_blockwise(values.contiguous(), code=_code(signed, values.device), blocksize=BLOCK)
    return codes, state.absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    import bitsandbytes.functional as bnbf

    if codes.numel() == 0:
        return torch.zeros(codes.shape, device=codes.device)
    return bnbf.dequantize_blockwise(codes, absmax=absmax, code=_code(signed, codes.device), blocksize=BLOCK)


# -- moments of the projected gradient -------------------------------------------------------------


def init_moments(state: dict[str, Any], low_shape: tuple[int, int], device: torch.device, eight_bit: bool) -> None:
    """Zero Adam moments of the projected shape: fp32 ``exp_avg``/``exp_avg_sq``, or with ``eight_bit``
    their codes and per-block scales (``exp_avg_q``/``exp_avg_absmax``, ``exp_avg_sq_q``/``exp_avg_sq_absmax``)."""
    if eight_bit:
        zeros = torch.zeros(low_shape, device=device)
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_8bit(zeros, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_8bit(zeros, signed=False)
    else:
        state["exp_avg"] = torch.zeros(low_shape, device=device)
        state["exp_avg_sq"] = torch.zeros(low_shape, device=device)


def _adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, low: Tensor, betas: tuple[float, float]) -> None:
    """Adam's moment recurrences, in place (shared by the fp32 and 8-bit storage)."""
    beta1, beta2 = betas
    exp_avg.lerp_(low, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1 - beta2)


def moments_fp32(state: dict[str, Any], low: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """GaLore (arXiv 2403.03507): Adam's moments of the projected gradient ``low``, kept in fp32 and
    updated in place; returns (exp_avg, exp_avg_sq)."""
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    _adam_moments_(exp_avg, exp_avg_sq, low, betas)
    return exp_avg, exp_avg_sq


def moments_8bit(state: dict[str, Any], low: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """8-bit GaLore (arXiv 2403.03507; blockwise quantization of 8-bit Adam, arXiv 2110.02861):
    dequantize the moments to fp32, update them as :func:`moments_fp32` does, quantize them back
    into the state; returns this step's fp32 moments (the direction uses them, not the codes)."""
    shape = low.shape
    exp_avg = dequantize_8bit(state["exp_avg_q"], state["exp_avg_absmax"], True).view(shape)
    exp_avg_sq = dequantize_8bit(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False).view(shape)
    _adam_moments_(exp_avg, exp_avg_sq, low, betas)
    state["exp_avg_q"], state["exp_avg_absmax"] = quantize_8bit(exp_avg, signed=True)
    state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_8bit(exp_avg_sq, signed=False)
    return exp_avg, exp_avg_sq


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, betas: tuple[float, float],
                   eps: float) -> tuple[Tensor, float]:
    """(m/(√v + ε√bc2), c): the Adam direction in the projected space and the bias correction c left
    to apply to it. Adam's corrections folded into one factor: m̂/(√v̂ + ε) = c · m/(√v + ε√bc2),
    c = √bc2/bc1, so each variant applies c where it is cheapest."""
    beta1, beta2 = betas
    root_bc2 = math.sqrt(1 - beta2**step)
    correction = root_bc2 / (1 - beta1**step)
    return exp_avg / exp_avg_sq.sqrt().add_(eps * root_bc2), correction


# -- the basis, per projection kind ----------------------------------------------------------------


def random_projection_bases(state: dict[str, Any], group: dict[str, Any], shape: tuple[int, int], side: str,
                            device: torch.device, due: bool) -> Bases:
    """APOLLO (arXiv 2412.05270): seeded Gaussian bases, regenerated every step from a seed that
    changes at each refresh (``basis_seed``, the only state): nothing else is stored."""
    if due:
        state["basis_seed"] = int(group["seed"]) * 1_000_003 + state["step"] * 7919 + state["index"]
    return random_bases(shape, group["rank"], side, state["basis_seed"], device)


def svd_refresh(grad: Tensor, rank: int, side: str, method: str, old: Bases, index: int, seed: int = 0,
                shards: Optional[Span] = None) -> Bases:
    """GaLore (arXiv 2403.03507): a new basis from the top-``rank`` singular subspace of the fp32
    gradient (``svd`` or ``randomized_svd``). A failed decomposition keeps ``old``; with no basis
    yet, it falls back to a random orthonormal one seeded by the matrix ``index``. With ``shards``
    (FSDP2) ``grad`` is this rank's rows and ``P`` comes back as its rows (:func:`sharded_svd_bases`;
    where one rank decomposes for all, the matrices take turns by ``index``); every rank ends with the
    same basis, so all of them fail or succeed together."""
    shape = tuple(grad.shape) if shards is None else (shards.rows, grad.shape[1])
    try:
        if shards is None:
            return svd_bases(grad, rank, side, method, seed)
        return sharded_svd_bases(grad, rank, side, method, shards, seed, root=index % shards.world_size)
    except (torch.linalg.LinAlgError, RuntimeError) as err:
        if isinstance(err, torch.distributed.DistError):  # a failed collective, not a decomposition
            raise
        # stacklevel 4: the warning points at the optimizer's step, past this function and the update
        if old[0] is None and old[1] is None:  # nothing to keep yet: a seeded random orthonormal basis
            warnings.warn(f"GaLore: SVD of a {shape} gradient failed ({err}); using a random basis until the "
                          "next refresh", stacklevel=4)
            p_, q_ = random_bases(shape, rank, side, index, grad.device)
            p_ = None if p_ is None else torch.linalg.qr(p_)[0]
            return (p_ if p_ is None or shards is None else shards.take(p_).contiguous(),
                    None if q_ is None else torch.linalg.qr(q_.T)[0].T)
        warnings.warn(f"GaLore: SVD of a {shape} gradient failed ({err}); keeping the previous basis", stacklevel=4)
        return old


# -- the moments across a refresh -------------------------------------------------------------------


def basis_change(old: Bases, new: Bases, reduce: Optional[Callable[[Tensor], Tensor]] = None
                 ) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(C_left, C_right), r×r: the new basis vectors in the old ones' coordinates, so that a projected
    gradient moves between bases as ``low_new ≈ C_left · low_old · C_rightᵀ`` (``C_left = P_newᵀ P_old``,
    ``C_right = Q_new Q_oldᵀ``); None on a side that is not projected. With ``P`` given as this rank's
    rows (FSDP2), ``reduce`` (an all-reduce sum, r×r) completes ``P_newᵀ P_old``."""
    left = None if new[0] is None or old[0] is None else new[0].T @ old[0]
    if left is not None and reduce is not None:
        left = reduce(left)
    right = None if new[1] is None or old[1] is None else new[1] @ old[1].T
    return left, right


def aligned_signs(new: Bases, change: tuple[Optional[Tensor], Optional[Tensor]]) -> Bases:
    """``new`` with each basis vector's sign flipped where it points away from its predecessor (a
    negative diagonal of the change of basis): a decomposition's arbitrary signs then do not decide
    what the kept moments mean."""
    def signs(c: Tensor) -> Tensor:
        return torch.where(c.diagonal() < 0, -1.0, 1.0).to(c.dtype)

    p, q = new
    if change[0] is not None:
        p = p * signs(change[0]).unsqueeze(0)
    if change[1] is not None:
        q = q * signs(change[1]).unsqueeze(1)
    return p, q


def rotate_moments(exp_avg: Tensor, exp_avg_sq: Tensor, change: tuple[Optional[Tensor], Optional[Tensor]]
                   ) -> tuple[Tensor, Tensor]:
    """The moments carried into the new basis: the first moment by the change of basis itself (a
    linear map, exact for a mean within the kept subspace), the second by its entries squared (each
    new coordinate's second moment as the old ones' weighted by their squared cosines, cross terms
    dropped: non-negative, and unchanged by any sign or permutation of the basis)."""
    left, right = change
    if left is not None:
        exp_avg, exp_avg_sq = left @ exp_avg, (left * left) @ exp_avg_sq
    if right is not None:
        exp_avg, exp_avg_sq = exp_avg @ right.T, exp_avg_sq @ (right * right).T
    return exp_avg, exp_avg_sq


def carry_moments(state: dict[str, Any], old: Bases, new: Bases, how: str, eight_bit: bool,
                  reduce: Optional[Callable[[Tensor], Tensor]] = None, rows: Optional[Span] = None) -> Bases:
    """At a refresh from ``old`` to ``new`` bases: ``"keep"`` leaves the moments in the old coordinates
    (the reference implementation, galore-torch); ``"align"`` flips new vectors to their
    predecessors' signs; ``"rotate"`` aligns too, then maps the moments into the new basis
    (:func:`rotate_moments`). ``reduce``: as in :func:`basis_change` (FSDP2, left bases as rows);
    ``rows``: the span of moments split by rows over ranks (FSDP2's left side, whose rotation mixes
    rows: gathered for it, one all-gather of r×n per moment and refresh). Returns the bases to store."""
    if how == "keep" or (old[0] is None and old[1] is None):
        return new
    new = aligned_signs(new, basis_change(old, new, reduce))
    if how == "align":
        return new
    change = basis_change(old, new, reduce)  # of the aligned basis: the stored bases and moments never depend on signs
    mixes_rows = rows is not None and rows.sharded and change[0] is not None

    def rotated(exp_avg: Tensor, exp_avg_sq: Tensor) -> tuple[Tensor, Tensor]:
        if not mixes_rows:
            return rotate_moments(exp_avg, exp_avg_sq, change)
        exp_avg, exp_avg_sq = rotate_moments(rows.gather(exp_avg), rows.gather(exp_avg_sq), change)
        return rows.take(exp_avg).contiguous(), rows.take(exp_avg_sq).contiguous()

    if eight_bit:  # through fp32, as every 8-bit step does
        shape = state["exp_avg_q"].shape
        exp_avg = dequantize_8bit(state["exp_avg_q"], state["exp_avg_absmax"], True).view(shape)
        exp_avg_sq = dequantize_8bit(state["exp_avg_sq_q"], state["exp_avg_sq_absmax"], False).view(shape)
        exp_avg, exp_avg_sq = rotated(exp_avg, exp_avg_sq)
        state["exp_avg_q"], state["exp_avg_absmax"] = quantize_8bit(exp_avg, signed=True)
        state["exp_avg_sq_q"], state["exp_avg_sq_absmax"] = quantize_8bit(exp_avg_sq, signed=False)
    else:
        state["exp_avg"], state["exp_avg_sq"] = rotated(state["exp_avg"], state["exp_avg_sq"])
    return new


# -- the update mapped back, per variant -----------------------------------------------------------


def channel_scale(direction: Tensor, low: Tensor, side: str) -> Tensor:
    """Per-channel ‖direction‖/‖low‖ along the dimension the projection keeps (rows for a right
    projection, columns for a left one; one number for ``full``), shaped to broadcast on G."""
    if side == "right":
        return (direction.norm(dim=1) / low.norm(dim=1).clamp(min=1e-8)).unsqueeze(1)
    if side == "left":
        return (direction.norm(dim=0) / low.norm(dim=0).clamp(min=1e-8)).unsqueeze(0)
    return direction.norm() / low.norm().clamp(min=1e-8)


def galore_update(direction: Tensor, bases: Bases) -> Tensor:
    """GaLore (arXiv 2403.03507): the projected Adam direction mapped back to the full matrix
    (its bias correction is left to the step's scalar factor)."""
    return project_back(direction, *bases)


def apollo_update(grad: Tensor, direction: Tensor, low: Tensor, correction: float, side: str) -> Tensor:
    """APOLLO (arXiv 2412.05270): the raw full-rank gradient scaled channel-wise by how much Adam
    changed the norm of each projected channel (``direction`` is consumed: corrected in place)."""
    return grad * channel_scale(direction.mul_(correction), low, side)


def fira_residual(state: dict[str, Any], grad: Tensor, low: Tensor, direction: Tensor, correction: float,
                  bases: Bases, side: str, norm_of: Callable[[Tensor], Tensor] = Tensor.norm) -> Tensor:
    """Fira (arXiv 2410.01623): the part of the gradient outside the subspace, scaled channel-wise
    like APOLLO, with the norm-growth limiter (at most ``FIRA_GROWTH``× the previous step's norm,
    kept as ``fira_norm``). ``norm_of`` gives the whole matrix's norm (FSDP2: from every rank's rows)."""
    residual = (grad - project_back(low, *bases)) * channel_scale(direction * correction, low, side)
    norm = norm_of(residual)
    previous = state.get("fira_norm")
    if previous is not None:  # the limiter is decided on the device: no host sync
        limit = FIRA_GROWTH * previous.to(norm.device)
        residual.mul_(torch.where(norm > limit, limit / norm, torch.ones_like(norm)))
        norm = torch.where(norm > limit, limit, norm)  # as before: a NaN norm does not stick
    state["fira_norm"] = norm.detach().clone()
    return residual


# -- the state under FSDP2 -------------------------------------------------------------------------
#
# A matrix sharded on dim 0 (FSDP2) is updated from this rank's rows. What its state holds per rank:
# the moments are split by their rows over the ranks, as torch.chunk splits them — on the right side
# (m×r) like the weight's rows, on the left side (r×n) by basis vector; the left side's basis P (m×r)
# holds this rank's rows too; Q (r×n) is whole on every rank, since every row's projection needs all
# of it. Torch's distributed checkpoints save a plain tensor once, as if every rank held it, so
# split state is kept as DTensors of the whole (``Shard(0)``, the parameter's mesh), and the update
# works on plain local views of them (:func:`local_state`, :func:`store_local_state`).

_MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_q", "exp_avg_sq_q")
_BLOCK_SCALES = ("exp_avg_absmax", "exp_avg_sq_absmax")


def moment_rows(shards: Span, shape: tuple[int, int], rank: int, side: str) -> Optional[Span]:
    """This rank's span of the moments of a sharded m×n matrix on ``side``: the right side's m×r
    rows go with the weight's, the left side's r×n are split by their r rows; ``full``'s r×r stay whole
    (None)."""
    if side == "full":
        return None
    return shards.split_as(projected_shape(shape, rank, side))


def local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state with every DTensor replaced by this rank's part (views: in-place updates reach it).
    The 8-bit block scales of row-split moments come back as this rank's blocks, without padding."""
    parts = {k: local(v) if isinstance(v, Tensor) else v for k, v in state.items()}
    for key in _BLOCK_SCALES:
        if isinstance(state.get(key), DTensor):
            codes = parts[key.replace("absmax", "q")]
            parts[key] = parts[key].view(-1)[:math.ceil(codes.numel() / BLOCK)]
    return parts


def store_local_state(state: dict[str, Any], parts: dict[str, Any], before: dict[str, Any], shards: Span,
                      moments: Optional[Span], basis_rows: Optional[Span] = None) -> None:
    """Write back into ``state`` what the update put into ``parts`` anew (entries that are not the
    objects they were in ``before``): the moments as DTensors of their whole (``moments``, their span;
    None: kept whole), P as rows of the weight's (``shards``), Q as rows of its r×n where
    ``basis_rows`` says (``shard_basis``); the 8-bit block scales of split moments
    as one padded row per rank (ranks quantize their rows alone, so their numbers of blocks differ:
    the DTensor (ranks × most blocks) is sharded evenly, and a checkpoint loads only at the number of
    ranks it was saved with); everything else as it is (the same on every rank)."""
    for key, value in parts.items():
        if key in before and before[key] is value:
            continue
        if not isinstance(value, Tensor):
            pass
        elif key == "basis_left":
            value = shards.as_dtensor(value)
        elif key == "basis_right" and basis_rows is not None:
            value = basis_rows.as_dtensor(value)
        elif moments is not None and key in _MOMENTS:
            value = moments.as_dtensor(value)
        elif moments is not None and key in _BLOCK_SCALES:
            width = math.ceil(moments.rows_per_rank * moments.shape[1] / BLOCK)
            padded = value.new_zeros(1, width)
            padded[0, :value.numel()] = value
            value = DTensor.from_local(padded, shards.mesh, [Shard(0)], run_check=False,
                                       shape=torch.Size((shards.world_size, width)), stride=(width, 1))
        state[key] = value


# -- the optimizer ---------------------------------------------------------------------------------


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore low-rank projected moments for parameter groups that carry ``rank``.

    Args:
        params: parameters or parameter groups. A group with ``rank`` (int > 0, at most the
            smaller dimension of each of its matrices) is projected; its other keys default to
            ``update_proj_gap`` 200 (steps between basis refreshes), ``scale`` 0.25 (α),
            ``proj_type`` ``"std"`` (``reverse_std``, ``left``, ``right``, ``full``), ``projection``
            ``"svd"`` (``randomized_svd``, ``random``), ``fira`` False (add the out-of-subspace
            residual, Fira), ``eight_bit`` False (8-bit moments), ``seed`` 0 (random projections),
            ``moments_on_refresh`` ``"rotate"`` (``align``, ``keep``: what a refresh does to the moments;
            see :func:`carry_moments`), ``shard_basis`` False (FSDP2: keep this rank's rows of Q and
            all-gather it at every step).
            An optional ``projected`` list of bools (one per parameter) projects only some of the
            group's matrices — how the GaLore callback converts a module's optimizer without
            changing its groups, so learning-rate schedulers stay valid.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW`` (weight decay 0.01).

    Parameters sharded on dim 0 (FSDP2's ``fully_shard`` on a 1-D mesh) are stepped from this rank's
    rows, with GaLore's side choice for the whole matrix. Per m×n matrix at rank r on N ranks: the
    right side (Q, r×n) communicates nothing per step and keeps ceil(m/N)·r rows of each moment (and
    Q whole, or with ``shard_basis`` ceil(r/N) rows of it, all-gathered at every step); the left side
    (P, m×r) reduce-scatters ``PᵀG`` (r×n) and all-gathers the r×n direction every step, keeps
    ceil(r/N)·n rows of each moment and ceil(m/N)·r rows of P. Refreshes: the right side's ``svd``
    all-reduces the n×n Gram matrix, ``randomized_svd`` (either side) the sketch's n×(r+8)
    products; the left side's ``svd`` gathers the gradient on one rank, which decomposes it and
    broadcasts P (the matrices take turns); ``random`` needs nothing. Fira adds one scalar all-reduce
    per step. Every rank must step the same matrices, as FSDP2's training step does.
    """

    # group lists aligned with group["params"], shrunk by whoever removes parameters
    # (lit_efficient.core.protocols.PerParameterOptions)
    per_parameter_options: tuple[str, ...] = ("projected",)

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr >= 0:
            raise ValueError(f"`lr` must be >= 0; got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"`betas` must lie in [0, 1); got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=None))
        for group in self.param_groups:
            if group["rank"] is not None:
                for key, value in GALORE_DEFAULTS.items():
                    group.setdefault(key, value)
                check_galore_group(group)
        self.refresh_seconds = 0.0  # time spent computing bases (for the logs)
        self.refreshes = 0
        # subspace kept at this step's refreshes, per matrix (id of the parameter; mean of both sides for "full")
        self.last_overlaps: dict[int, float] = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded floating-point state to each parameter's dtype: the fp32 moments and
        # bases of a bf16/fp16 matrix would come back rounded. Every tensor is taken again from the
        # state dict itself, exactly as saved, on its parameter's device.
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        # saved parameters are keyed by position, or by name where torch's distributed checkpoint
        # (FSDP2) loads them; either way the saved groups list them in this optimizer's order
        saved = dict(zip((key for group in state_dict["param_groups"] for key in group["params"]), params))
        for index, values in state_dict["state"].items():
            param = saved[index] if index in saved else params[int(index)]
            state = self.state[param]
            for key, value in values.items():
                if isinstance(value, Tensor) and key in state:
                    state[key] = value.to(device=param.device, copy=True)

    def matrix_index(self, p: Tensor) -> int:
        """``p``'s position among the parameters this optimizer was built with (or later given):
        the per-matrix seed, the same on every rank and whichever parameter gets state first."""
        return self._indices.setdefault(id(p), len(self._indices))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        indices = self.__dict__.setdefault("_indices", {})
        for p in self.param_groups[-1]["params"]:
            indices.setdefault(id(p), len(indices))

    def restart_state(self, p: Tensor) -> None:
        """Forget the projected moments and basis of ``p``: its next step starts them afresh, as at step 0.

        Sparse training calls this when weights of ``p`` regrow: they must start with zero state,
        and low-rank moments cannot be zeroed entry by entry. Unprojected state is left alone
        (its entries can be zeroed directly)."""
        state = self.state.get(p)
        if not state or "step" not in state:
            return
        if isinstance(state.get("exp_avg"), Tensor) and state["exp_avg"].shape == p.shape:  # plain AdamW state
            return
        self.state[p] = {"index": state["index"]} if "index" in state else {}

    @staticmethod
    def is_projected(p: Tensor, group: dict[str, Any], flag: bool = True) -> bool:
        """Whether ``p`` (whose entry in the group's ``projected`` list is ``flag``) is projected."""
        return flag and group["rank"] is not None and p.dim() == 2 and group["rank"] < min(p.shape)

    def projected_params(self) -> list[tuple[Tensor, dict[str, Any]]]:
        """(parameter, group) of every projected matrix, in group order."""
        return [(p, group) for group in self.param_groups
                for p, flag in zip(group["params"], group.get("projected") or [True] * len(group["params"]))
                if self.is_projected(p, group, flag)]

    def gradient_parts(self, trainer: Any = None) -> list[tuple[str, Tensor, Part]]:
        """What the coming step reads of each projected matrix's gradient
        (:class:`lit_efficient.core.protocols.ReadsPartOfGradients`): its projection onto the current
        bases, except on a refresh step (the decomposition reads the whole gradient) and for the
        variants that read the whole gradient at every step (APOLLO's random projection scales it,
        Fira adds its residual)."""
        parts: list[tuple[str, Tensor, Part]] = []
        for p, group in self.projected_params():
            state = self.state.get(p, {})
            left, right = state.get("basis_left"), state.get("basis_right")
            whole = (group["projection"] == "random" or group["fira"] or "step" not in state
                     or state["step"] % group["update_proj_gap"] == 0 or (left is None and right is None))
            parts.append(("galore", p, None if whole else Projection(left, right)))
        return parts

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self.start_step()  # (the per-layer mode has stepped and freed every gradient inside backward)
        for group in self.param_groups:
            flags = group.get("projected") or [True] * len(group["params"])
            plain = []
            for p, flag in zip(group["params"], flags):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                if self.is_projected(p, group, flag):
                    self._galore_update(p, group, self.state[p])
                else:
                    plain.append(p)
            if plain:
                self._adamw_update(plain, group)
        return loss

    def start_step(self) -> None:
        """Forget the previous step's per-step records (:attr:`last_overlaps`): :meth:`step` calls it,
        and whoever steps matrices one by one with :meth:`step_param` calls it before each step."""
        self.last_overlaps = {}

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict[str, Any], flag: bool = True) -> None:
        """One update of ``p`` from ``p.grad`` (also what the per-layer mode calls inside backward)."""
        if p.grad.is_sparse:
            raise RuntimeError("GaLoreAdamW does not support sparse gradients")
        if self.is_projected(p, group, flag):
            self._galore_update(p, group, self.state[p])
        else:
            self._adamw_update([p], group)

    def _adamw_update(self, params: list[Tensor], group: dict[str, Any]) -> None:
        """Plain AdamW on ``params``: torch's update, batched with foreach kernels per step count."""
        by_step: dict[int, list[Tensor]] = {}
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            by_step.setdefault(state["step"], []).append(p)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        for step, chosen in by_step.items():
            grads = [p.grad for p in chosen]
            exp_avgs = [self.state[p]["exp_avg"] for p in chosen]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in chosen]
            if group["weight_decay"]:
                torch._foreach_mul_(chosen, 1 - lr * group["weight_decay"])
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(chosen, exp_avgs, denom, value=-lr / (1 - beta1**step))

    def _bases(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor, side: str,
               shards: Optional[Span] = None, moments: Optional[Span] = None) -> Bases:
        """The current (P, Q), refreshed every ``update_proj_gap`` steps, by the projection kind's function
        (with ``shards``, FSDP2: ``grad`` and ``P`` are this rank's rows, the moments ``moments``' rows)."""
        shape, rank = tuple(p.shape), group["rank"]
        due = state["step"] % group["update_proj_gap"] == 0
        if group["projection"] == "random":
            left, right = random_projection_bases(state, group, shape, side, grad.device, due)
            return (left if shards is None or left is None else shards.take(left)), right  # drawn whole, as alone
        reduce = None if shards is None else shards.all_reduce
        old = (state.get("basis_left"), state.get("basis_right"))
        if due or (old[0] is None and old[1] is None):
            synchronize(grad.device)  # a refresh step: the clock times the decomposition, not queued work
            start = time.perf_counter()
            sketch_seed = int(group["seed"]) * 1_000_003 + state["step"] * 7919 + state["index"]  # randomized_svd
            new = svd_refresh(grad, rank, side, group["projection"], old, state["index"], sketch_seed, shards)
            if new is not old:  # a failed decomposition keeps the old basis, and the moments with it
                # a group restored from a checkpoint written before this option continues as it ran: "keep"
                how = group.get("moments_on_refresh", "keep")
                new = carry_moments(state, old, new, how, group["eight_bit"], reduce, moments)
            synchronize(grad.device)
            self.refresh_seconds += time.perf_counter() - start
            self.refreshes += 1
            overlaps = []
            for name, before, after in (("basis_left", old[0], new[0]), ("basis_right", old[1], new[1])):
                if after is not None:
                    if before is not None and before is not after:
                        overlaps.append(subspace_overlap(before, after, rows=name == "basis_right", reduce=reduce))
                    state[name] = after.to(grad.dtype)
            if overlaps:
                self.last_overlaps[id(p)] = sum(overlaps) / len(overlaps)
            state["basis_step"] = state["step"]
        return state.get("basis_left"), state.get("basis_right")

    def _galore_update(self, p: Tensor, group: dict[str, Any], stored: dict[str, Any]) -> None:
        """One projected step of ``p``: basis, moments, direction and the variant's update, each from
        its own function above; then decoupled weight decay and the step itself.

        A parameter sharded on dim 0 (FSDP2) is stepped from this rank's rows of its gradient, with
        the same numbers one process would compute: the side stays GaLore's choice for the whole
        matrix, and each rank keeps its rows of the moments. The right side (``G Qᵀ``, row by row)
        needs no communication per step. On the left side ``Pᵀ G`` is a sum over row blocks: one
        reduce-scatter of r×n gives each rank its rows of it (an all-reduce where APOLLO or Fira need
        all of it), and one all-gather assembles the direction (r×n) from every rank's rows. ``full``
        all-reduces r×r, Fira's limiter a scalar; refreshes as :func:`sharded_svd_bases` says. With the
        group's ``shard_basis``, Q (r×n) is kept as this rank's rows and all-gathered for each step."""
        shards = row_shards(p.grad)
        grad = (p.grad if shards is None else p.grad.to_local()).float()
        side = projection_side(tuple(p.shape), group["proj_type"])
        rows = None if shards is None else moment_rows(shards, tuple(p.shape), group["rank"], side)
        state = stored if shards is None else local_state(stored)
        before = None if shards is None else dict(state)
        basis_rows = None  # with shard_basis: this rank keeps its rows of Q, gathered whole for the step
        if shards is not None and group.get("shard_basis") and side != "left" and group["projection"] != "random":
            basis_rows = shards.split_as((group["rank"], p.shape[1]))
            if state.get("basis_right") is not None:
                state["basis_right"] = basis_rows.gather(state["basis_right"])
        if "step" not in state:
            state["step"] = 0
            if "index" not in state:  # distinct seeds per matrix, the same on every rank
                state["index"] = self.matrix_index(p)
            low_shape = projected_shape(tuple(grad.shape), group["rank"], side)
            if rows is not None:
                low_shape = (rows.local_rows, rows.shape[1])
            init_moments(state, low_shape, p.device, group["eight_bit"])
        bases = self._bases(p, group, state, grad, side, shards, rows)
        low = project(grad, *bases)
        low_here = low  # the rows of the projected gradient whose moments this rank keeps
        whole_low = group["projection"] == "random" or group["fira"]  # APOLLO's and Fira's scales read all of it
        if shards is not None and side == "full":
            shards.all_reduce(low)
        elif shards is not None and side == "left":
            if whole_low:
                low_here = rows.take(shards.all_reduce(low))
            else:
                low = low_here = rows.reduce_scatter(low)
        state["step"] += 1
        moments = moments_8bit if group["eight_bit"] else moments_fp32
        exp_avg, exp_avg_sq = moments(state, low_here, group["betas"])
        direction, correction = adam_direction(exp_avg, exp_avg_sq, state["step"], group["betas"], group["eps"])
        if shards is not None and side == "left":
            direction = rows.gather(direction)  # Σ over rows of the basis needs every vector's coefficients
        if group["projection"] == "random":
            update, factor = apollo_update(grad, direction, low, correction, side), 1.0
        elif group["fira"]:
            update = galore_update(direction, bases)
            norm_of = Tensor.norm if shards is None else lambda t: shards.all_reduce(t.pow(2).sum()).sqrt()
            residual = fira_residual(state, grad, low, direction, correction, bases, side, norm_of)
            update, factor = update.mul_(correction).add_(residual), 1.0
        else:
            update, factor = galore_update(direction, bases), correction
        lr = group["lr"]
        weight = p if shards is None else local_part(p)[0]  # under no_grad: the shard itself
        if group["weight_decay"]:
            weight.mul_(1 - lr * group["weight_decay"])
        weight.add_(update.to(weight.dtype), alpha=-lr * group["scale"] * factor)
        if shards is not None:
            if basis_rows is not None:
                state["basis_right"] = basis_rows.take(state["basis_right"]).contiguous()
            store_local_state(stored, state, before, shards, rows, basis_rows)


# -- memory accounting -----------------------------------------------------------------------------


def state_bytes(optimizer: torch.optim.Optimizer, params: Optional[Iterable[Tensor]] = None) -> int:
    """Bytes of optimizer-state tensors (moments, bases, quantization scales) this rank holds,
    optionally only for ``params``."""
    chosen = None if params is None else {id(p) for p in params}
    total = 0
    for p, state in optimizer.state.items():
        if chosen is None or id(p) in chosen:  # under FSDP2: what this rank holds
            total += sum(local_bytes(v) for v in state.values() if isinstance(v, Tensor) and v.dim() > 0)
    return total


def galore_state_numel(shape: tuple[int, int], rank: int, proj_type: str = "std", stored_basis: bool = True) -> int:
    """State elements of one projected matrix: two moments of the projected shape plus the basis."""
    side = projection_side(shape, proj_type)
    low = math.prod(projected_shape(shape, rank, side))
    return 2 * low + (basis_numel(shape, rank, side) if stored_basis else 0)


__all__ = ["GALORE_DEFAULTS", "GaLoreAdamW", "channel_scale", "check_galore_group", "dequantize_8bit",
           "galore_state_numel", "quantize_8bit", "state_bytes"]
