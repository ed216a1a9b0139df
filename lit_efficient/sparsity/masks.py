"""The mask engine every sparse technique shares.

A mask is a boolean buffer (``sparsity_mask``) registered on each targeted module in ``setup``, so
it is part of the model's state dict with the same key from step 0 to the end and is restored
with the weights — never rebuilt from ``w != 0`` (regrown weights are exactly zero).

After every optimizer step :meth:`SparseMasks.apply` multiplies each weight by its mask and zeroes
the masked entries of every optimizer state tensor of the weight's shape (SGD momentum, Adam's
moments, bitsandbytes' 8-bit moments — set to the code of 0.0), so neither momentum nor weight
decay can revive a pruned weight. Gradients stay dense: growth criteria need them.

Pure helpers (no Trainer needed): :func:`uniform_densities`, :func:`erk_densities`,
:func:`keep_counts`, :func:`topk_mask`, :func:`random_mask`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

from lit_efficient.core.protocols import RestartableState
from lit_efficient.core.targets import Target

MASK_BUFFER = "sparsity_mask"


def uniform_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Every layer at ``density``."""
    return [float(density)] * len(shapes)


def erk_densities(shapes: Sequence[Sequence[int]], density: float) -> list[float]:
    """Erdős–Rényi-Kernel layer densities (RigL, arXiv 1911.11134).

    Layer l gets ``ε · sum(shape_l) / prod(shape_l)``, with ε chosen so the total number of kept
    weights is ``density`` × the total; a layer that would exceed density 1 is made dense and ε
    is solved again over the others.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must lie in (0, 1]; got {density}")
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set[int] = set()
    while True:
        budget = density * sum(sizes) - sum(sizes[i] for i in dense)
        weighted = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        if weighted <= 0:
            return [1.0 if i in dense else 0.0 for i in range(len(shapes))]
        eps = budget / weighted
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]
        dense.update(over)


def keep_counts(shapes: Sequence[Sequence[int]], densities: Sequence[float],
                total_density: Optional[float] = None) -> list[int]:
    """Whole numbers of weights to keep per layer for ``densities``.

    With ``total_density`` the counts are adjusted (largest remainders first) so that they add up
    to exactly ``round(total_density × total)``, which per-layer rounding alone does not ensure.
    """
    sizes = [math.prod(s) for s in shapes]
    exact = [d * n for d, n in zip(densities, sizes)]
    counts = [min(n, int(math.floor(e))) for e, n in zip(exact, sizes)]
    if total_density is None:
        return [min(n, int(round(e))) for e, n in zip(exact, sizes)]
    missing = int(round(total_density * sum(sizes))) - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order:
        if missing <= 0:
            break
        if counts[i] < sizes[i]:
            counts[i] += 1
            missing -= 1
    return counts


def count_true(masks: Sequence[Tensor]) -> list[int]:
    """The number of True entries of each mask, read in one device-to-host sync."""
    if not masks:
        return []
    return [int(n) for n in torch.stack([m.sum() for m in masks]).tolist()]


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of exactly ``k`` entries with the largest ``scores``."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten().float(), k, sorted=False).indices] = True
    return mask.view_as(scores)


def random_mask(shape: Sequence[int], k: int, generator: torch.Generator, device=None) -> Tensor:
    """Boolean mask with exactly ``k`` entries chosen uniformly at random by ``generator``."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask.view(*shape).to(device)


def global_magnitude_masks(weights: Sequence[Tensor], masks: Sequence[Tensor], keep: int,
                           fixed: Optional[Sequence[bool]] = None) -> list[Tensor]:
    """Keep the ``keep`` largest-magnitude active weights across all layers together (GraNet's
    global pruning); inactive positions stay inactive. Layer densities drift, as intended.
    Layers flagged in ``fixed`` (frozen ones) keep every active weight, counted within ``keep``."""
    fixed = fixed or [False] * len(masks)
    scores = [torch.where(m, torch.full_like(w, float("inf"), dtype=torch.float32) if f else w.detach().abs().float(),
                          torch.full_like(w, -1.0, dtype=torch.float32)) for w, m, f in zip(weights, masks, fixed)]
    flat = torch.cat([s.flatten() for s in scores])
    keep = max(0, min(keep, int(sum(int(m.sum()) for m in masks))))
    chosen = topk_mask(flat, keep)
    out, offset = [], 0
    for s in scores:
        out.append(chosen[offset : offset + s.numel()].view_as(s))
        offset += s.numel()
    return out


def drop_and_grow(weight: Tensor, mask: Tensor, count: int, grow_scores: Tensor, drop_scores: Optional[Tensor] = None,
                  regrow_dropped: bool = True) -> Tensor:
    """Drop the ``count`` active weights of one layer with the smallest ``drop_scores`` (default:
    magnitude) and grow ``count`` inactive positions with the largest ``grow_scores`` (|gradient|,
    |momentum| or random).

    Just-dropped positions are candidates for growth (as in RigL) unless ``regrow_dropped`` is
    False (SparCL explores positions that were inactive). The number of active weights is unchanged.
    """
    active = int(mask.sum())
    count = max(0, min(count, active, mask.numel() - active))
    if count == 0:
        return mask.clone()
    drop_by = weight.detach().abs() if drop_scores is None else drop_scores.detach()
    magnitude = torch.where(mask, drop_by.float(), torch.full_like(weight, float("inf"), dtype=torch.float32))
    dropped = topk_mask(-magnitude, count)
    kept = mask & ~dropped
    closed = kept if regrow_dropped else mask
    closed_score = torch.full_like(weight, -float("inf"), dtype=torch.float32)
    candidates = torch.where(closed, closed_score, grow_scores.detach().float())
    return kept | topk_mask(candidates, count)


_ZERO_CODES: dict[int, tuple[Tensor, int]] = {}  # id -> (the code book, kept alive so ids stay unique; its code)


def _zero_code(codebook: Tensor, key: str) -> int:
    """The index of the code 0.0 in an 8-bit code book, looked up (one sync) once per code book."""
    known = _ZERO_CODES.get(id(codebook))
    if known is None or known[0] is not codebook:
        zero = (codebook == 0).nonzero()
        if zero.numel() == 0:
            raise RuntimeError(f"8-bit optimizer state {key!r} has no exact code for 0.0")
        known = _ZERO_CODES[id(codebook)] = (codebook, int(zero[0, 0]))
    return known[1]


def zero_optimizer_state(optimizer: Optional[torch.optim.Optimizer], param: Tensor, where: Tensor) -> None:
    """Zero the optimizer's per-element state of ``param`` at the True entries of ``where``.

    Every state tensor of the parameter's shape counts (momentum buffers, Adam moments); 8-bit
    states (bitsandbytes ``state1``/``state2`` with code books ``qmap1``/``qmap2``) are set to the
    code whose value is exactly 0.0.
    """
    if optimizer is None:
        return
    state = optimizer.state.get(param)
    if not state:
        return
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.shape != param.shape:
            continue
        if value.dtype == torch.uint8:
            codebook = state.get("qmap" + key[-1]) if key.startswith("state") else None
            if codebook is None:
                continue
            value.masked_fill_(where, _zero_code(codebook, key))
        elif value.is_floating_point():
            value.masked_fill_(where, 0)


def fan_in(target: Target) -> int:
    """Multiply-accumulates per output element of a target (0 for embeddings: a lookup)."""
    if target.kind == "embedding":
        return 0
    out_dim = 1 if target.transposed else 0
    return target.param.numel() // target.param.shape[out_dim]


class ForwardFlops:
    """Dense forward FLOPs of each target, measured on the next forward pass through hooks.

    ``2 × fan_in`` FLOPs per output element (a multiply and an add per weight used); the hooks
    remove themselves after one call of each module.
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = list(targets)
        self.flops: list[Optional[float]] = [None] * len(self.targets)
        self._handles = []

    def attach(self) -> "ForwardFlops":
        self.detach()
        for i, target in enumerate(self.targets):
            self._handles.append(target.module.register_forward_hook(self._hook(i, target)))
        return self

    def _hook(self, i: int, target: Target):
        def record(module, args, output):
            if self.flops[i] is None and isinstance(output, Tensor):
                self.flops[i] = 2.0 * output.numel() * fan_in(target)

        return record

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def measured(self) -> bool:
        return all(f is not None for f in self.flops)

    def ratio(self, densities: Sequence[float]) -> float:
        """FLOPs of the targets at ``densities`` relative to dense (1.0 if nothing was measured)."""
        dense = sum(f or 0.0 for f in self.flops)
        if dense == 0:
            return 1.0
        return sum((f or 0.0) * d for f, d in zip(self.flops, densities)) / dense


class SparseMasks:
    """Boolean masks on a list of targets, applied to weights and optimizer state.

    Args:
        targets: the weights to sparsify (from :func:`lit_efficient.core.targets.select_targets`).
    """

    def __init__(self, targets: Sequence[Target]) -> None:
        if not targets:
            raise ValueError("no targets to sparsify")
        self.targets = list(targets)
        self._nonzeros: Optional[list[int]] = None
        for target in self.targets:
            module = target.module
            existing = getattr(module, MASK_BUFFER, None)
            if existing is None:
                module.register_buffer(MASK_BUFFER, torch.ones_like(target.param, dtype=torch.bool), persistent=True)
            elif not isinstance(existing, Tensor) or existing.shape != target.param.shape:
                raise ValueError(f"{target.name} already has an attribute {MASK_BUFFER!r} that is not a mask")

    # -- access -------------------------------------------------------------------------------
    @property
    def masks(self) -> list[Tensor]:
        return [getattr(t.module, MASK_BUFFER) for t in self.targets]

    @property
    def params(self) -> list[nn.Parameter]:
        return [t.param for t in self.targets]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(t.param.shape) for t in self.targets]

    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    # -- accounting ---------------------------------------------------------------------------
    def nonzeros(self) -> list[int]:
        """Active weights per layer; counted once after each change (counting syncs with the device)."""
        if self._nonzeros is None:
            self._nonzeros = count_true(self.masks)
        return list(self._nonzeros)

    def recount(self) -> None:
        """Forget the counts: the masks changed outside :meth:`set_masks` (a checkpoint was loaded into them)."""
        self._nonzeros = None

    def sizes(self) -> list[int]:
        return [m.numel() for m in self.masks]

    def layer_densities(self) -> list[float]:
        return [nnz / size for nnz, size in zip(self.nonzeros(), self.sizes())]

    def density(self) -> float:
        return sum(self.nonzeros()) / sum(self.sizes())

    def sparsity(self) -> float:
        return 1.0 - self.density()

    # -- changes ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_masks(self, new_masks: Iterable[Tensor], optimizer: Optional[torch.optim.Optimizer] = None) -> list[int]:
        """Replace the masks in place (``copy_``: no new tensors, no recompiles) and apply them.

        Positions that become active start at weight 0 with zero optimizer state. Returns the
        number of positions grown per layer.
        """
        grown_counts = []
        for target, mask, new in zip(self.targets, self.masks, new_masks):
            new = new.to(device=mask.device, dtype=torch.bool)
            grown = new & ~mask
            target.param.masked_fill_(grown, 0)
            zero_optimizer_state(optimizer, target.param, grown)
            grown_counts.append(int(grown.sum()))
            if grown_counts[-1] and isinstance(optimizer, RestartableState):  # no entry-wise zeroing (GaLore)
                optimizer.restart_state(target.param)
            mask.copy_(new)
        self.recount()
        self.apply(optimizer)
        return grown_counts

    @torch.no_grad()
    def apply(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero masked weights and their optimizer state (call after every optimizer step)."""
        for target, mask in zip(self.targets, self.masks):
            target.param.mul_(mask)
            if optimizer is not None:
                zero_optimizer_state(optimizer, target.param, ~mask)

    def is_applied(self) -> bool:
        """Whether every masked weight is exactly zero."""
        return all(bool((t.param[~m] == 0).all()) for t, m in zip(self.targets, self.masks))


__all__ = [
    "MASK_BUFFER",
    "ForwardFlops",
    "drop_and_grow",
    "fan_in",
    "global_magnitude_masks",
    "SparseMasks",
    "count_true",
    "erk_densities",
    "keep_counts",
    "random_mask",
    "topk_mask",
    "uniform_densities",
    "zero_optimizer_state",
]
