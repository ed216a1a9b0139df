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

Under FSDP2 each weight is a DTensor sharded on dim 0, and so is its mask
(:meth:`SparseMasks.shard_like_params`): every rank applies the mask of its own rows to its rows
of the weight and of each optimizer-state tensor. Densities and counts are of whole layers (one
all-reduce), random choices are drawn for the whole layer from the shared generator and each rank
keeps its part, and top-k choices go through :func:`lit_efficient.core.shards.largest`, so every
mask is exactly the one a single process would choose. Ties go to the lower flat index.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lit_efficient.core.gradient_travel import kept_indices
from lit_efficient.core.protocols import RestartableState
from lit_efficient.core.shards import Span, counts, largest, local
from lit_efficient.core.targets import Target

MASK_BUFFER = "sparsity_mask"
#: the momentum of each target's dense gradient (``growth="momentum"``), a buffer beside its mask
MOMENTUM_BUFFER = "sparsity_gradient_momentum"


def first_moment_beta(group: dict) -> float:
    """The decay of an optimizer group's first moment: Adam's ``betas[0]``, SGD's ``momentum``, and
    0.9 (Sparse Momentum's) for an optimizer with neither."""
    if "betas" in group:
        return float(group["betas"][0])
    return float(group["momentum"]) if group.get("momentum") else 0.9


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


def topk_mask(scores: Tensor, k: int, span: Optional[Span] = None) -> Tensor:
    """Boolean mask of exactly ``k`` entries with the largest ``scores`` (ties: the lower flat
    index). ``scores`` may be a rank's part of a tensor split as ``span`` says (FSDP2): ``k`` then
    counts over the whole tensor, and the mask is this rank's part of the whole one's."""
    if span is None or span.group is None:
        return largest(scores.flatten(), k).view_as(scores)
    return largest(scores.flatten(), k, span.positions(scores.device), span.group, span.whole).view_as(scores)


def random_mask(shape: Sequence[int], k: int, generator: torch.Generator, device=None) -> Tensor:
    """Boolean mask with exactly ``k`` entries chosen uniformly at random by ``generator``."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:k]] = True
    return mask.view(*shape).to(device)


def global_magnitude_masks(weights: Sequence[Tensor], masks: Sequence[Tensor], keep: int,
                           fixed: Optional[Sequence[bool]] = None, spans: Optional[Sequence[Span]] = None,
                           active: Optional[Sequence[int]] = None) -> list[Tensor]:
    """Keep the ``keep`` largest-magnitude active weights across all layers together (GraNet's
    global pruning); inactive positions stay inactive. Layer densities drift, as intended.
    Layers flagged in ``fixed`` (frozen ones) keep every active weight, counted within ``keep``.

    ``weights`` and ``masks`` may be ranks' parts of the layers (``spans``, with the layers'
    ``active`` counts over ranks): the choice is the one made from the whole layers."""
    fixed = fixed or [False] * len(masks)
    spans = spans or [Span.whole_tensor(m.shape) for m in masks]
    active = list(active) if active is not None else counts(masks, None)
    group = next((s.group for s in spans if s.group is not None), None)
    values, positions, offset = [], [], 0
    for w, m, f, span in zip(weights, masks, fixed, spans):
        score = torch.full_like(w, float("inf"), dtype=torch.float32) if f else w.detach().abs().float()
        values.append(score[m])
        if group is not None:  # flat indices in all layers laid end to end: ties go to the earlier
            positions.append((span.positions(m.device) + offset)[m.flatten()])
        offset += span.whole
    total = sum(active)
    chosen = largest(torch.cat(values), max(0, min(keep, total)), torch.cat(positions) if positions else None,
                     group, total)
    out, start = [], 0
    for m in masks:
        new = torch.zeros_like(m)
        n = int(values[len(out)].numel())
        new[m] = chosen[start: start + n]
        out.append(new)
        start += n
    return out


def drop_and_grow(weight: Tensor, mask: Tensor, count: int, grow_scores: Tensor, drop_scores: Optional[Tensor] = None,
                  regrow_dropped: bool = True, span: Optional[Span] = None, active: Optional[int] = None) -> Tensor:
    """Drop the ``count`` active weights of one layer with the smallest ``drop_scores`` (default:
    magnitude) and grow ``count`` inactive positions with the largest ``grow_scores`` (|gradient|,
    |momentum| or random).

    Just-dropped positions are candidates for growth (as in RigL) unless ``regrow_dropped`` is
    False (SparCL explores positions that were inactive). The number of active weights is unchanged.
    The tensors may be a rank's part of the layer (``span``, with the layer's ``active`` count over
    ranks): the choice is the one made from the whole layer.
    """
    span = span or Span.whole_tensor(mask.shape)
    active = int(mask.sum()) if active is None else active
    count = max(0, min(count, active, span.whole - active))
    if count == 0:
        return mask.clone()
    positions = span.positions(mask.device) if span.group is not None else None

    def choose(where: Tensor, scores: Tensor, k: int, total: int) -> Tensor:
        """The k largest ``scores`` among the positions ``where`` (``total`` of them over ranks)."""
        picked = torch.zeros_like(mask)
        flat = where.flatten()
        at = positions[flat] if positions is not None else None
        picked.view(-1)[flat] = largest(scores.flatten()[flat].float(), k, at, span.group, total)
        return picked

    drop_by = weight.detach().abs() if drop_scores is None else drop_scores.detach()
    dropped = choose(mask, -drop_by.float(), count, active)
    kept = mask & ~dropped
    closed = kept if regrow_dropped else mask
    open_positions = span.whole - active + (count if regrow_dropped else 0)
    return kept | choose(~closed, grow_scores.detach(), count, open_positions)


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
        value = local(value)  # under FSDP2 the state is sharded like the parameter, and so is ``where``
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

    Under FSDP2 call :meth:`shard_like_params` once the module is sharded: each mask then holds
    the rows of its weight this rank holds, and :attr:`masks`, :attr:`weights` are this rank's
    parts, while :attr:`shapes`, :meth:`sizes` and the counts are of whole layers.

    Args:
        targets: the weights to sparsify (from :func:`lit_efficient.core.targets.select_targets`).
        gradient_momentum: also keep the momentum of each target's dense gradient, at every
            position (:meth:`accumulate_gradient_momentum`; one fp32 buffer of the weight's shape).
    """

    def __init__(self, targets: Sequence[Target], gradient_momentum: bool = False) -> None:
        if not targets:
            raise ValueError("no targets to sparsify")
        self.targets = list(targets)
        self.tracks_momentum = bool(gradient_momentum)
        self._nonzeros: Optional[list[int]] = None
        self._kept: Optional[list[Tensor]] = None
        self._grown: Optional[list[int]] = None  # per layer, summed over set_masks calls while counting
        self.spans = [Span.whole_tensor(t.param.shape) for t in self.targets]
        self._sharded_params: Optional[list[nn.Parameter]] = None
        for target in self.targets:
            module = target.module
            existing = getattr(module, MASK_BUFFER, None)
            if existing is None:
                module.register_buffer(MASK_BUFFER, torch.ones_like(target.param, dtype=torch.bool), persistent=True)
            elif not isinstance(existing, Tensor) or existing.shape != target.param.shape:
                raise ValueError(f"{target.name} already has an attribute {MASK_BUFFER!r} that is not a mask")
            if self.tracks_momentum and getattr(module, MOMENTUM_BUFFER, None) is None:
                module.register_buffer(MOMENTUM_BUFFER, torch.zeros_like(target.param, dtype=torch.float32),
                                       persistent=True)

    @torch.no_grad()
    def shard_like_params(self) -> bool:
        """Shard each mask as its weight is sharded (FSDP2 after ``fully_shard``: a DTensor buffer
        with the weight's mesh and placement, so checkpoints save and load it sharded under the same
        key); True if any weight is sharded. Whole weights keep whole masks."""
        self.spans = [Span.of(t.param) for t in self.targets]
        if any(span.group is not None for span in self.spans):
            # FSDP2 leaves a gathered copy in the module's slot at times (a frozen block's weight after
            # the backward prefetched it): the sharded parameters, the optimizer's, are kept from here
            self._sharded_params = [t.param for t in self.targets]
        buffers = [MASK_BUFFER, MOMENTUM_BUFFER] if self.tracks_momentum else [MASK_BUFFER]
        for target, span, param in zip(self.targets, self.spans, self.params):
            for name in buffers:
                whole = getattr(target.module, name)
                if span.group is None or isinstance(whole, DTensor):
                    continue
                setattr(target.module, name, span.as_dtensor(span.take(whole.to(local(param).device)).clone()))
        self.recount()
        return self.group is not None

    @property
    def group(self):
        """The process group the masks are sharded over (None: whole on every rank)."""
        return next((s.group for s in self.spans if s.group is not None), None)

    # -- access -------------------------------------------------------------------------------
    @property
    def masks(self) -> list[Tensor]:
        """This rank's part of each mask (the whole mask unless sharded)."""
        return [local(getattr(t.module, MASK_BUFFER)) for t in self.targets]

    @property
    def gradient_momentum(self) -> list[Tensor]:
        """This rank's part of each target's dense-gradient momentum (``gradient_momentum=True``)."""
        return [local(getattr(t.module, MOMENTUM_BUFFER)) for t in self.targets]

    @property
    def params(self) -> list[nn.Parameter]:
        """The targeted parameters themselves (DTensors under FSDP2: keys of the optimizer state)."""
        return list(self._sharded_params) if self._sharded_params is not None else [t.param for t in self.targets]

    @property
    def weights(self) -> list[Tensor]:
        """This rank's part of each targeted weight (in-place changes reach the parameter)."""
        return [local(p) for p in self.params]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Whole shapes."""
        return [tuple(p.shape) for p in self.params]

    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    # -- accounting ---------------------------------------------------------------------------
    def nonzeros(self) -> list[int]:
        """Active weights per layer; counted once after each change (counting syncs with the device;
        sharded, one all-reduce)."""
        if self._nonzeros is None:
            self._nonzeros = counts(self.masks, self.group)
        return list(self._nonzeros)

    def recount(self) -> None:
        """Forget the counts: the masks changed outside :meth:`set_masks` (a checkpoint was loaded into them)."""
        self._nonzeros = None
        self._kept = None

    def kept_indices(self) -> list[Tensor]:
        """Flat positions of each mask's active entries (this rank's part); found once after each
        change (one sync with the device)."""
        if self._kept is None:
            self._kept = [kept_indices(m) for m in self.masks]
        return list(self._kept)

    def sizes(self) -> list[int]:
        return [span.whole for span in self.spans]

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
        number of positions grown per layer (whole layers)."""
        grown_masks = []
        for param, weight, mask, new in zip(self.params, self.weights, self.masks, new_masks):
            new = new.to(device=mask.device, dtype=torch.bool)
            grown = new & ~mask
            weight.masked_fill_(grown, 0)
            zero_optimizer_state(optimizer, param, grown)
            grown_masks.append(grown)
            mask.copy_(new)
        grown_counts = counts(grown_masks, self.group)
        if self._grown is not None:
            self._grown = [a + b for a, b in zip(self._grown, grown_counts)]
        if isinstance(optimizer, RestartableState):  # no entry-wise zeroing (GaLore)
            for param, grown in zip(self.params, grown_counts):
                if grown:
                    optimizer.restart_state(param)
        self.recount()
        self.apply(optimizer)
        return grown_counts

    @torch.no_grad()
    def accumulate_gradient_momentum(self, optimizer: torch.optim.Optimizer, finite: Optional[Tensor] = None) -> None:
        """``m ← β·m + (1 − β)·grad`` at every position of each target with a gradient, ``β`` its
        optimizer group's first-moment decay. The optimizer's own moments cannot serve growth: the
        masks zero them at inactive positions after every step. ``finite`` (a device bool) skips the
        update where False (an fp16 overflow step the GradScaler skips), without a host sync."""
        betas = {id(p): first_moment_beta(group) for group in optimizer.param_groups for p in group["params"]}
        for param, momentum in zip(self.params, self.gradient_momentum):
            if param.grad is None or id(param) not in betas:
                continue  # frozen, or not trained by this optimizer
            grad = local(param.grad).float()
            if finite is None:
                momentum.lerp_(grad, 1.0 - betas[id(param)])
            else:
                momentum.copy_(torch.where(finite, momentum.lerp(grad, 1.0 - betas[id(param)]), momentum))

    def count_changes(self) -> list[int]:
        """Start counting the positions grown per layer by the coming :meth:`set_masks` calls (an
        update may prune, then drop and grow); returns the active counts before them."""
        self._grown = [0] * len(self.targets)
        return self.nonzeros()

    def changes_since(self, before: Sequence[int]) -> tuple[list[int], list[int]]:
        """Positions (pruned, grown) per layer since :meth:`count_changes` returned ``before``; stops
        counting."""
        grown = self._grown if self._grown is not None else [0] * len(self.targets)
        self._grown = None
        pruned = [b + g - a for b, g, a in zip(before, grown, self.nonzeros())]
        return pruned, list(grown)

    @torch.no_grad()
    def apply(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Zero masked weights and their optimizer state (call after every optimizer step)."""
        for param, weight, mask in zip(self.params, self.weights, self.masks):
            weight.mul_(mask)
            if optimizer is not None:
                zero_optimizer_state(optimizer, param, ~mask)

    def is_applied(self) -> bool:
        """Whether every masked weight is exactly zero (on this rank's part)."""
        return all(bool((w[~m] == 0).all()) for w, m in zip(self.weights, self.masks))


__all__ = [
    "MOMENTUM_BUFFER",
    "first_moment_beta",
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
