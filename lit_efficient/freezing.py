"""Progressive layer freezing that really skips the backward of what it freezes.

Papers: Brock et al., "FreezeOut: Accelerate Training by Progressively Freezing Layers", 2017,
https://arxiv.org/abs/1706.04983 (reference code: github.com/ajbrock/FreezeOut); Liu et al.,
"AutoFreeze: Automatically Freezing Model Blocks to Accelerate Fine-tuning", 2021,
https://arxiv.org/abs/2102.01386.

A model is cut into blocks in forward order; block 0 carries everything upstream of the first
block (patch embedding and class/position tokens, token embeddings, a UNet's ``conv_in`` and time
embedding). Only a *prefix* is ever frozen: then no parameter upstream of the frozen blocks needs
a gradient, autograd records nothing for them, and the whole backward through them disappears —
unlike freezing leaf modules in the middle, which saves only their weight gradients (Composer's
LayerFreezing, ~5%). Frozen blocks also run under ``torch.no_grad()`` (so a tied embedding that
keeps training through the output head does not pull the backward back in), their parameters
leave the optimizer with their state freed, and by default they run in eval mode so BatchNorm
statistics stop moving.

Schedules (on optimizer steps, changes only between steps so DDP ranks agree):
``"freezeout"`` — block i of L freezes at ``warp(t0 + (1 − t0)·i/L)`` of the run;
``"linear"`` — the frozen fraction grows linearly from ``freeze_start`` to ``freeze_level`` at the
end; ``"adaptive"`` — every ``check_every`` steps, the prefix of active blocks whose gradient norm
changed by less than the ``percentile`` of the active blocks' changes is frozen.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_efficient.freezing_cache import FrozenOutputCache, _tensors
from lit_efficient.monitor import EfficientCallback, SavingsRow, Throughput, step_logs_due
from lit_efficient.schedules import Time, TimeSpec, TrainingLength, check_bool, check_fraction, is_due, progress
from lit_efficient.targets import fqn_matches, no_match_message, refuse_sharded_strategies, validate_patterns

Schedule = Literal["freezeout", "linear", "adaptive"]
Warp = Literal["linear", "squared", "cubic"]
TiedEmbeddings = Literal["train", "freeze"]
WARPS = {"linear": 1, "squared": 2, "cubic": 3}


@dataclass
class Block:
    """One unit of freezing: modules (run without a graph once frozen) and the parameters frozen."""

    name: str
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    stem: int = 0  # leading modules that feed the block's stack (embeddings): always run, never cached

    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.params)


# -- block discovery ----------------------------------------------------------------------------


def _known_layout(module: nn.Module) -> Optional[tuple[list[str], list[str], list[str]]]:
    """(stem modules, stem parameters, blocks) of a recognised architecture, names relative to it."""
    has = lambda *names: all(getattr(module, n, None) is not None for n in names)  # noqa: E731
    if has("patch_embed", "blocks") and isinstance(module.blocks, nn.Sequential):  # timm ViT family
        params = [n for n in ("cls_token", "reg_token", "pos_embed") if isinstance(getattr(module, n, None), nn.Parameter)]
        return ["patch_embed", "norm_pre"], params, [f"blocks.{i}" for i in range(len(module.blocks))]
    if has("conv1", "bn1", "layer1", "layer4"):  # timm / torchvision ResNet: residual blocks of every stage
        blocks = [f"layer{s}.{i}" for s in range(1, 5) for i in range(len(getattr(module, f"layer{s}")))]
        return ["conv1", "bn1"], [], blocks
    if has("stem", "stages") and isinstance(module.stages, nn.Sequential):  # timm ConvNeXt and friends
        return ["stem"], [], [f"stages.{i}" for i in range(len(module.stages))]
    if has("conv_in", "time_embedding", "down_blocks"):  # diffusers UNet2DModel / UNet2DConditionModel
        stem = [n for n in ("time_proj", "time_embedding", "class_embedding", "conv_in") if has(n)]
        return stem, [], [f"down_blocks.{i}" for i in range(len(module.down_blocks))]
    if has("wte", "wpe", "h"):  # Hugging Face GPT-2
        return ["wte", "wpe"], [], [f"h.{i}" for i in range(len(module.h))]
    if has("embed_tokens", "layers") and isinstance(module.layers, nn.ModuleList):  # Llama, Mistral, Qwen...
        return ["embed_tokens"], [], [f"layers.{i}" for i in range(len(module.layers))]
    if has("embeddings", "encoder") and isinstance(getattr(module.encoder, "layer", None), nn.ModuleList):  # BERT
        return ["embeddings"], [], [f"encoder.layer.{i}" for i in range(len(module.encoder.layer))]
    return None


def _generic_layout(model: nn.Module) -> Optional[tuple[str, list[str]]]:
    """The first ``nn.Sequential``/``nn.ModuleList`` with two or more parameterised children.

    A Sequential of identical composite blocks (``Sequential(Block(), Block(), Block())``, each with
    parameterised submodules) is a trunk whose head lies outside it: every child is a block. Any other
    Sequential (``Linear, ReLU, ..., Linear``, or blocks followed by a different layer) is taken for a
    whole network ending in its head, and its last parameterised child is never frozen.
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            children = [(n, c) for n, c in module.named_children() if _has_params(c)]
            if isinstance(module, nn.Sequential) and not _identical_composites([c for _, c in children]):
                children = children[:-1]  # a plain stack ends with its head: never frozen
            if len(children) >= 2:
                return name, [n for n, _ in children]
    return None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _identical_composites(children: list[nn.Module]) -> bool:
    """All of one type and built of the same kinds of parts, each made of parameterised submodules
    (blocks, or stages of blocks; not bare layers, and not a head such as ``Sequential(Flatten(),
    Linear())`` after ``Sequential(Conv, BatchNorm, ReLU)`` stages)."""
    def parts(module: nn.Module) -> frozenset:
        return frozenset(type(s) for s in module.children())

    return (len({(type(c), parts(c)) for c in children}) == 1
            and all(any(_has_params(s) for s in c.children()) for c in children))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def discover_blocks(model: nn.Module) -> list[Block]:
    """Blocks of ``model`` in forward order, block 0 carrying the known stems (embeddings).

    Recognises timm ViT/ResNet/ConvNeXt, diffusers UNets, Hugging Face GPT-2/Llama/BERT, then falls
    back to the first Sequential/ModuleList stack (see :func:`_generic_layout`). Raises ``ValueError``
    if nothing is recognised. Whatever else runs before the first block (a custom model's embedding
    or stem) is found on the first training forward and joins block 0 then
    (:class:`ProgressiveFreezing`'s prefix check).
    """
    for prefix, module in model.named_modules():
        layout = _known_layout(module)
        if layout is None:
            continue
        stem_modules, stem_params, block_names = layout
        blocks = [Block(_join(prefix, n), [(_join(prefix, n), module.get_submodule(n))]) for n in block_names]
        first = blocks[0]
        stem = [(_join(prefix, n), getattr(module, n)) for n in stem_modules if isinstance(getattr(module, n, None), nn.Module)]
        first.modules = stem + first.modules
        first.stem = len(stem)
        first.params = [(_join(prefix, n), getattr(module, n)) for n in stem_params]
        return _with_params(blocks)
    generic = _generic_layout(model)
    if generic is None:
        raise ValueError(
            "`blocks`: could not find the blocks of this model (no timm ViT/ResNet/ConvNeXt, diffusers UNet, "
            "Hugging Face GPT-2/Llama/BERT, nor a Sequential/ModuleList stack); list them in forward order, "
            "e.g. blocks=['model.embed', 'model.layers.*']"
        )
    stack, children = generic
    stack_module = model.get_submodule(stack) if stack else model
    blocks = [Block(_join(stack, c), [(_join(stack, c), stack_module.get_submodule(c))]) for c in children]
    return _with_params(blocks)


def blocks_from_patterns(model: nn.Module, patterns: list[str]) -> list[Block]:
    """One block per module (top-most matches, registration order) or parameter each pattern names,
    in the order of the patterns."""
    named_modules = [(n, m) for n, m in model.named_modules() if n]
    named_params = list(model.named_parameters())
    blocks: list[Block] = []
    taken: list[str] = []
    for pattern in patterns:
        found = [(n, m) for n, m in named_modules if fqn_matches(n, pattern)]
        found = [(n, m) for n, m in found if not _within(n, taken)]
        found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
        if found:
            for n, m in found:
                blocks.append(Block(n, [(n, m)]))
                taken.append(n)
            continue
        params = [(n, p) for n, p in named_params if fqn_matches(n, pattern)]
        if not params:
            raise ValueError(no_match_message(pattern, [n for n, _ in named_modules] + [n for n, _ in named_params], "blocks"))
        blocks.extend(Block(n, [], [(n, p)]) for n, p in params)
    return _with_params(blocks)


def _with_params(blocks: list[Block]) -> list[Block]:
    seen: set[int] = set()
    for block in blocks:
        params = list(block.params)
        for module_name, module in block.modules:
            params.extend((f"{module_name}.{n}", p) for n, p in module.named_parameters())
        block.params = []
        for name, p in params:
            if id(p) not in seen:
                seen.add(id(p))
                block.params.append((name, p))
    return blocks


def _within(name: str, modules: list[str]) -> bool:
    """``name`` is one of ``modules`` or lies inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)


def _leaves_behind(tensors: list[torch.Tensor]) -> set[int]:
    """Ids of the leaf tensors (parameters) whose values ``tensors`` were computed from, read off
    their autograd graph."""
    found = {id(t) for t in tensors if t.grad_fn is None}
    stack, seen = [t.grad_fn for t in tensors if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


# -- schedules ------------------------------------------------------------------------------------


def freezeout_times(num_blocks: int, t0: float, warp: str) -> list[float]:
    """Fraction of the run at which each block freezes: ``warp(t0 + (1 − t0)·i/L)``."""
    power = WARPS[warp]
    return [(t0 + (1.0 - t0) * i / num_blocks) ** power for i in range(num_blocks)]


def freezeout_lr_factor(step: float, freeze_step: float) -> float:
    """FreezeOut's per-block learning-rate factor: cosine from 1 at step 0 to 0 at ``freeze_step``."""
    if freeze_step <= 0:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / freeze_step)))


def linear_frozen_count(fraction_of_run: float, num_blocks: int, freeze_start: float, freeze_level: float) -> int:
    """Blocks frozen by the linear ramp: ``freeze_level`` of them at the end, none before ``freeze_start``."""
    if fraction_of_run < freeze_start:
        return 0
    level = freeze_level * progress(fraction_of_run, freeze_start, 1.0)
    return int(level * num_blocks + 1e-9)


def adaptive_frozen_prefix(changes: list[float], percentile: float) -> int:
    """How many leading active blocks to freeze: those whose gradient-norm change is below the
    ``percentile`` of all active blocks' changes."""
    if not changes:
        return 0
    with np.errstate(invalid="ignore"):
        threshold = float(np.percentile(np.asarray(changes, dtype=np.float64), percentile))
    if math.isnan(threshold):  # a NaN change (or inf - inf): it compares False with everything and would
        return 0  # freeze every block at once
    count = 0
    for change in changes:
        if change >= threshold:
            break
        count += 1
    return count


def remove_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Remove ``params`` (by identity) from every param group and free their state; returns how many
    were found. Groups stay (possibly empty) so LR schedulers keep matching them."""
    ids = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        keep = [id(p) not in ids for p in group["params"]]
        removed += keep.count(False)
        # per-parameter lists in the group (GaLoreAdamW's `projected` flags) shrink alongside
        for key, value in list(group.items()):
            if isinstance(value, list) and len(value) == len(keep):
                group[key] = [v for v, k in zip(value, keep) if k]
    for p in params:
        optimizer.state.pop(p, None)
    return removed


# -- the callback -------------------------------------------------------------------------------


class ProgressiveFreezing(EfficientCallback):
    """Freeze a model front-to-back during training (see the module docstring).

    Args:
        schedule: ``"freezeout"`` (default), ``"linear"`` or ``"adaptive"``.
        t0: FreezeOut: when the first block freezes, before warping, in (0, 1] (default 0.8).
        warp: FreezeOut: ``"linear"``, ``"squared"`` or ``"cubic"`` (default) warp of the freeze times.
        freeze_start: linear/adaptive: when freezing may begin (time spec; default 0.5).
        freeze_level: linear/adaptive: the largest fraction of blocks frozen, in (0, 1] (default 1.0).
        check_every: adaptive: time between gradient-norm checks (time spec; default ``"50st"``).
        percentile: adaptive: threshold percentile of the active blocks' changes, in (0, 100] (default 50).
        blocks: the blocks in forward order as module-name globs (or parameter names); default:
            discovered for timm, diffusers and Hugging Face models, else the model's first
            Sequential/ModuleList stack (see :func:`discover_blocks`). They must form an autograd
            prefix, which is checked on the first training step: modules and parameters that run
            before the first block (embeddings, a stem) join block 0, announced once; a module of no
            block that runs between the first and the last block is refused.
        frozen_eval: put frozen blocks in eval mode (BatchNorm statistics and dropout stop; default True).
        tied_embeddings: a frozen embedding tied to a trainable output head (GPT-2): ``"train"``
            (default) keeps the shared matrix training through the head only; ``"freeze"`` freezes
            it, head included.
        cache_frozen_mb: keep the frozen blocks' output for every input row seen, in up to this many
            MiB, and serve it instead of running them again; only unseen rows run (default 0: off).
            Pays when the same inputs return every epoch (no random augmentation); otherwise nothing
            hits, and after two such epochs the cache frees its rows and stops, with a warning.
            Needs ``frozen_eval``; not under ``torch.compile``; a model returning intermediate hidden states gets the skipped blocks'
            inputs there. See :mod:`lit_efficient.freezing_cache`.
        lr_annealing: FreezeOut: scale each block's updates by ``½(1 + cos(π t / t_i))``, reaching
            zero at its freeze time ``t_i``, on top of the module's own LR schedule (default False).
            Works with any optimizer whose update is proportional to the learning rate (SGD, Adam,
            AdamW including weight decay): the step is taken, then shrunk towards the old weights.
    """

    technique = "freezing"

    def __init__(
        self,
        schedule: Schedule = "freezeout",
        t0: float = 0.8,
        warp: Warp = "cubic",
        freeze_start: TimeSpec = 0.5,
        freeze_level: float = 1.0,
        check_every: TimeSpec = "50st",
        percentile: float = 50.0,
        blocks: Optional[list[str]] = None,
        frozen_eval: bool = True,
        tied_embeddings: TiedEmbeddings = "train",
        lr_annealing: bool = False,
        cache_frozen_mb: float = 0.0,
    ) -> None:
        if schedule not in ("freezeout", "linear", "adaptive"):
            raise ValueError(f"`schedule` must be 'freezeout', 'linear' or 'adaptive'; got {schedule!r}")
        if warp not in WARPS:
            raise ValueError(f"`warp` must be one of {list(WARPS)}; got {warp!r}")
        if tied_embeddings not in ("train", "freeze"):
            raise ValueError(f"`tied_embeddings` must be 'train' or 'freeze'; got {tied_embeddings!r}")
        self.schedule = schedule
        self.t0, self.warp = check_fraction(t0, "t0", high_open=False, low_open=True), warp
        self.freeze_start = Time.parse(freeze_start, "freeze_start")
        self.freeze_level = check_fraction(freeze_level, "freeze_level", high_open=False, low_open=True)
        self.check_every = Time.parse(check_every, "check_every")
        if self.check_every.value == 0:
            raise ValueError("`check_every` must be positive")
        self.percentile = check_fraction(percentile, "percentile", 0.0, 100.0, high_open=False, low_open=True)
        self.block_patterns = validate_patterns(blocks, "blocks") or None
        self.frozen_eval = check_bool(frozen_eval, "frozen_eval")
        self.tied_embeddings = tied_embeddings
        if lr_annealing and schedule != "freezeout":
            raise ValueError("`lr_annealing` anneals each block to its FreezeOut freeze time: use schedule='freezeout'")
        self.lr_annealing = check_bool(lr_annealing, "lr_annealing")
        self.cache_frozen_mb = check_fraction(cache_frozen_mb, "cache_frozen_mb", 0.0, math.inf)
        if self.cache_frozen_mb and not self.frozen_eval:
            raise ValueError("`cache_frozen_mb` needs frozen_eval=True: frozen blocks in train mode (dropout) "
                             "do not return the same output twice")
        self._cache: Optional[FrozenOutputCache] = None
        self._served_before = self._idle_epochs = 0
        self._epoch_mark: tuple[int, int] = (-1, -1)
        self._annealing: list[tuple[torch.Tensor, torch.Tensor, float]] = []

        self.blocks: list[Block] = []
        self.frozen = 0  # blocks 0..frozen-1 are frozen
        self.previous_norms: list[float] = []
        self.frozen_param_steps = 0.0  # sum over steps of the frozen fraction of parameters
        self.counted_steps = 0
        self.throughput = Throughput()  # samples/s over windows of steps, this process only (not state)
        self._check_deferred = False  # an adaptive check fell on an overflow step: check on the next one
        self._total_params = 0
        self._tied: set[int] = set()
        self._hooks: list = []
        self._probe: Optional[list] = None
        self._order: list[str] = []
        self._watched: list[str] = []
        self._upstream: Optional[list[torch.Tensor]] = None  # the first block's inputs on the first forward
        self._joined_modules: list[str] = []  # what the probe added to block 0 (state: re-joined on resume)
        self._joined_params: list[str] = []
        self._restored_join: tuple[list[str], list[str]] = ([], [])
        self._length: Optional[TrainingLength] = None
        self._start_step = self._every = 0
        self._pending = 0
        self._last_step = -1
        self._fraction, self._fraction_for = 0.0, -1

    # -- set-up -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, "ProgressiveFreezing", "blocks could not be frozen whole")
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            # frozen parameters get no gradient: DDP must not wait for them
            strategy._ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("ProgressiveFreezing: DDP set to find_unused_parameters=True (frozen blocks get no gradients)")
        self.blocks = blocks_from_patterns(pl_module, self.block_patterns) if self.block_patterns else discover_blocks(pl_module)
        self._joined_modules, self._joined_params = [], []
        self._total_params = sum(p.numel() for p in pl_module.parameters())
        self._fraction_for = -1
        self._tied = self._tied_params(pl_module) if self.tied_embeddings == "train" else set()
        self._start_probe(pl_module)
        if self.cache_frozen_mb:
            if getattr(pl_module, "_compiler_ctx", None):
                raise ValueError("`cache_frozen_mb`: frozen outputs cannot be cached in a torch.compile'd module")
            self._cache = FrozenOutputCache(int(self.cache_frozen_mb * 2**20))
        super().setup(trainer, pl_module, stage)

    def _tied_params(self, pl_module: "pl.LightningModule") -> set[int]:
        """Block parameters also reachable under a name outside every block (GPT-2's tied head)."""
        members = [n for b in self.blocks for n, _ in b.modules]
        own = {n for b in self.blocks for n, _ in b.params}
        in_blocks = {id(p) for b in self.blocks for _, p in b.params}
        tied = set()
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            inside = name in own or _within(name, members)
            if id(p) in in_blocks and not inside:
                tied.add(id(p))
        return tied

    def _start_probe(self, pl_module: "pl.LightningModule") -> None:
        """Record the order in which blocks and the other parameterised modules first run in training
        (grad enabled: not the sanity check), and what the first block receives, to check on the first
        training step that the blocks form an autograd prefix."""
        members = [n for b in self.blocks for n, _ in b.modules]
        main = {n for b in self.blocks for n, _ in b.modules[b.stem :]}
        in_blocks = {id(p) for b in self.blocks for _, p in b.params}
        watched = list(members)
        for name, module in pl_module.named_modules():
            inside = _within(name, members)
            ancestor = any(m.startswith(name + ".") for m in members) or not name  # runs around the blocks
            own = [p for p in module.parameters(recurse=False) if id(p) not in in_blocks]
            if own and not inside and not ancestor:
                watched.append(name)
        self._order, self._probe, self._watched, self._upstream = [], [], watched, None

        def record(name, mod, args, kwargs):
            if torch.is_grad_enabled() and name not in self._order:
                self._order.append(name)
                if name in main and self._upstream is None and not torch.compiler.is_compiling():
                    self._upstream = [t for t in _tensors((args, kwargs)) if t.requires_grad]

        for name in watched:
            module = pl_module.get_submodule(name)
            self._probe.append(module.register_forward_pre_hook(functools.partial(record, name), with_kwargs=True))

    def _check_prefix(self, pl_module: "pl.LightningModule") -> None:
        """What ran before the first block joins block 0; a module of no block between the first and
        the last block is refused (its gradient would need the backward through the frozen blocks)."""
        for handle in self._probe or []:
            handle.remove()
        captured, upstream = self._upstream is not None, self._upstream or []  # not captured under torch.compile
        self._probe, self._upstream = None, None
        members = [n for b in self.blocks for n, _ in b.modules]
        main = [n for b in self.blocks for n, _ in b.modules[b.stem :]]
        ran = [i for i, n in enumerate(self._order) if _within(n, members)]
        if not ran:
            return
        first = next((i for i, n in enumerate(self._order) if _within(n, main)), max(ran))
        for name in self._order[first : max(ran)]:
            if not _within(name, members):
                raise ValueError(
                    f"`blocks` must form an autograd prefix: {name!r} runs after the first block "
                    f"({self.blocks[0].name!r}) and before the last ({self.blocks[-1].name!r}) but belongs to no "
                    "block, so its gradient would still need the backward through the frozen blocks after it. "
                    "Add it to a block or stop the blocks before it"
                )
        if self.frozen:
            return  # resumed with block 0 frozen: it stays as it was when the checkpoint was taken
        read = _leaves_behind(upstream)
        modules = self._outermost([n for n in self._order[:first] if not _within(n, members)], members)
        if captured:  # only what feeds the first block: a branch that reaches the head alone keeps training
            modules = [n for n in modules if any(id(p) in read for p in pl_module.get_submodule(n).parameters())]
        taken = {id(p) for b in self.blocks for _, p in b.params}
        taken |= {id(p) for n in modules for p in pl_module.get_submodule(n).parameters()}
        params = [n for n, p in pl_module.named_parameters() if id(p) in read and id(p) not in taken]
        if modules or params:
            self._join_first_block(pl_module, modules, params)
            rank_zero_info(f"ProgressiveFreezing: {', '.join(map(repr, modules + params))} run before the first "
                           f"block and join block 0 ({self.blocks[0].name!r})")

    def _outermost(self, names: list[str], members: list[str]) -> list[str]:
        """``names`` (parameterised modules, in run order), each replaced by the outermost module
        whose parameterised parts all ran among them (``embed`` for ``embed.0``, ``embed.1``) and
        that holds no block."""
        result: list[str] = []
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts)):
                outer = ".".join(parts[:i])
                holds_block = any(_within(m, [outer]) for m in members)
                if not holds_block and all(w in names for w in self._watched if _within(w, [outer])):
                    name = outer
                    break
            if name not in result:
                result.append(name)
        return result

    def _join_first_block(self, pl_module: "pl.LightningModule", modules: list[str], params: list[str]) -> None:
        """Add ``modules`` to block 0's stem (they ran before its stack: frozen with it, never cached)
        and their and ``params``' parameters to block 0, once each."""
        first = self.blocks[0]
        found = []
        for name in modules:
            try:
                found.append((name, pl_module.get_submodule(name)))
            except AttributeError:
                raise ValueError(f"`blocks`: block 0 held {name!r} when the checkpoint was taken; this model has "
                                 "no such module") from None
        named = dict(pl_module.named_parameters())
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"`blocks`: block 0 held {missing} when the checkpoint was taken; this model has no "
                             "such parameters")
        taken = {id(p) for b in self.blocks for _, p in b.params}
        candidates = [(f"{n}.{k}", p) for n, m in found for k, p in m.named_parameters()] + [(n, named[n]) for n in params]
        new = []
        for name, p in candidates:
            if id(p) not in taken:
                taken.add(id(p))
                new.append((name, p))
        first.modules[first.stem : first.stem] = found
        first.stem += len(found)
        first.params[:0] = new
        self._joined_modules += modules
        self._joined_params += params
        self._tied = self._tied_params(pl_module) if self.tied_embeddings == "train" else set()
        self._fraction_for = -1

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._length = TrainingLength.from_trainer(trainer)
        self._start_step = self.freeze_start.to_steps(self._length, "freeze_start")
        self._every = max(1, self.check_every.to_steps(self._length, "check_every"))
        if self.schedule != "adaptive" and self._length.total_steps is None:
            raise ValueError(f"schedule={self.schedule!r} needs a known run length (max_steps or max_epochs)")
        self.throughput.start(pl_module.device)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a restored frozen set is applied here: after the optimizer exists, before its state is loaded;
        # block 0 first gets back what the probe joined to it, so that it freezes whole
        (modules, params), self._restored_join = self._restored_join, ([], [])
        if modules or params:
            self._join_first_block(pl_module, modules, params)
        restored, self.frozen = self.frozen, 0
        self.freeze_to(restored, trainer, pl_module)
        if self.lr_annealing:
            # right after each optimizer step, before any callback's on_train_batch_end (a sparse
            # callback's pruning must not be blended back in): the result is independent of their order
            for optimizer in trainer.optimizers:
                self._hooks.append(optimizer.register_step_post_hook(lambda *_: self._anneal_last_step()))

    # -- the schedule -------------------------------------------------------------------------
    def scheduled_count(self, step: int) -> int:
        """Blocks that should be frozen after optimizer step ``step`` (never fewer than now)."""
        total = self._length.total_steps if self._length else None
        limit = len(self.blocks)
        fraction = self.position(step) / total if total else 0.0
        if self.schedule == "freezeout":
            count = sum(1 for t in freezeout_times(limit, self.t0, self.warp) if fraction >= t)
        elif self.schedule == "linear":
            start = self._start_step / total if total else 1.0
            count = linear_frozen_count(fraction, limit, start, self.freeze_level)
        else:
            count = self._pending
        return max(self.frozen, min(count, limit))

    # -- every step ---------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx) -> None:
        if self.frozen_eval:
            for block in self.blocks[: self.frozen]:
                for _, module in block.modules:
                    if module.training:
                        module.eval()  # Lightning puts the whole model back in train mode each epoch
        if self._cache is not None:
            self._cache.active = True

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._cache is not None:
            self._epoch_mark = (self.frozen, self._cache.row_hits)

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.throughput.close(pl_module.device, restart=False)  # validation is not training throughput

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.throughput.start(pl_module.device)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.throughput.close(pl_module.device)
        cache = self._cache
        if cache is None or cache.disabled is not None or not self.frozen:
            return
        # a whole epoch on one frozen prefix, and not one training row came back: nothing repeats
        idle = self._epoch_mark == (self.frozen, cache.row_hits)
        self._idle_epochs = self._idle_epochs + 1 if idle else 0
        if self._idle_epochs >= 2:
            cache.disable("no input to the frozen blocks came back in two epochs (random augmentation, dropout "
                          "before them, or an embedding still training through a tied head?)", for_good=True)

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch, batch_idx,
                                  dataloader_idx: int = 0) -> None:
        if self._cache is not None and self.frozen:  # validation inputs repeat too (frozen blocks: eval either way)
            self._cache.active = True

    @override
    def on_validation_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self._cache is not None:
            self._cache.active = False

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss) -> None:
        if self._probe is not None:
            self._check_prefix(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        if self.lr_annealing:
            self._snapshot_for_annealing(trainer.global_step)
        step = trainer.global_step + 1
        if self.schedule != "adaptive" or self.position(step) < self._start_step:
            return
        if not (self._check_deferred or is_due(step, self._every)):
            return
        # not from an fp16 overflow step: NaN norms once froze every block at once, irreversibly
        self._check_deferred = not self.gradients_finite(optimizer, "the adaptive freezing check", step)
        if self._check_deferred:
            return
        # gradients here are unscaled (AMP) and averaged (DDP): every rank decides alike
        squares = []
        for block in self.blocks[self.frozen:]:
            grads = [p.grad.detach().float().pow(2).sum() for _, p in block.params if p.grad is not None]
            squares.append(torch.stack(grads).sum() if grads else torch.zeros((), device=pl_module.device))
        norms = torch.stack(squares).sqrt().tolist() if squares else []  # one sync (fp32 roots, as before)
        previous = self.previous_norms[-len(norms):] if len(self.previous_norms) >= len(norms) else []
        self.previous_norms = norms
        if not previous:
            return
        changes = [abs(p - c) / p if p > 0 else float("inf") for p, c in zip(previous, norms)]
        limit = int(self.freeze_level * len(self.blocks) + 1e-9)
        self._pending = min(limit, self.frozen + adaptive_frozen_prefix(changes, self.percentile))

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch, batch_idx) -> None:
        self.throughput.add(_batch_size(batch))
        if self._cache is not None:
            self._cache.active = False
        if trainer.global_step == self._last_step:
            return  # no optimizer step since the last call (gradient accumulation)
        self._last_step = step = trainer.global_step
        self.frozen_param_steps += self.frozen_fraction()
        self.counted_steps += 1
        self.freeze_to(self.scheduled_count(step), trainer, pl_module)
        metrics: dict[str, Any] = {"frozen_fraction": self.frozen_fraction(), "frozen_blocks": float(self.frozen)}
        if step_logs_due(trainer):  # the clock is read (after a device sync) only on the steps Lightning logs
            rate = self.throughput.close(pl_module.device)
            if rate is not None:
                metrics["samples_per_second"] = rate
        if self._cache is not None:
            metrics["cache_served"] = float(self._cache.served > self._served_before)  # whole prefix, this step
            metrics["cache_megabytes"] = self._cache.nbytes / 2**20
            self._served_before = self._cache.served
        self.log_metrics(pl_module, metrics)

    def _snapshot_for_annealing(self, step: int) -> None:
        total = self._length.total_steps if self._length else None
        if not total:
            return
        times = freezeout_times(len(self.blocks), self.t0, self.warp)
        self._annealing = []
        for block, t in list(zip(self.blocks, times))[self.frozen :]:
            factor = freezeout_lr_factor(self.position(step), t * total)
            if factor < 1.0:
                self._annealing.extend((p, p.detach().clone(), factor) for _, p in block.params
                                       if p.requires_grad and id(p) not in self._tied)

    @torch.no_grad()
    def _anneal_last_step(self) -> None:
        """Shrink the step just taken: ``old + factor·(new − old)`` is the step at ``factor``·lr."""
        for param, old, factor in self._annealing:
            param.sub_(old).mul_(factor).add_(old)
        self._annealing = []

    # -- freezing -----------------------------------------------------------------------------
    def freeze_to(self, count: int, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Freeze blocks ``self.frozen .. count-1``."""
        if count <= self.frozen:
            return
        newly = self.blocks[self.frozen : count]
        params = [p for b in newly for _, p in b.params if id(p) not in self._tied]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for optimizer in trainer.optimizers:
            remove_from_optimizer(optimizer, params)
        for block in newly:
            for _, module in block.modules:
                self._hooks.append(module.register_forward_pre_hook(_enter_no_grad))
                self._hooks.append(module.register_forward_hook(_exit_no_grad, always_call=True))
                if self.frozen_eval:
                    module.eval()
        if self._cache is not None:
            self._cache.extend([module for block in newly for _, module in block.modules[block.stem :]])
        self.frozen = count
        rank_zero_info(f"ProgressiveFreezing: {count}/{len(self.blocks)} blocks frozen (up to {newly[-1].name}) "
                       f"at step {trainer.global_step}")

    def frozen_fraction(self) -> float:
        """Fraction of the module's parameters frozen now (cached: it changes only in ``freeze_to``)."""
        if self._fraction_for != self.frozen:
            frozen = sum(p.numel() for b in self.blocks[: self.frozen] for _, p in b.params if id(p) not in self._tied)
            self._fraction = frozen / self._total_params if self._total_params else 0.0
            self._fraction_for = self.frozen
        return self._fraction

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        for handle in self._hooks + (self._probe or []):
            handle.remove()
        self._hooks, self._probe = [], None
        if self._cache is not None:
            self._cache.remove()
            self._cache = None

    # -- reporting ----------------------------------------------------------------------------
    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if not self.blocks:
            return []
        mean_frozen = self.frozen_param_steps / max(1, self.counted_steps)
        rows = [
            SavingsRow(self.technique, "blocks frozen at the end", f"{self.frozen}/{len(self.blocks)} "
                       f"({self.frozen_fraction():.1%} of parameters)"),
            SavingsRow(self.technique, "parameter-steps frozen (weight gradients and optimizer work skipped)",
                       f"{mean_frozen:.1%}", 1.0 - mean_frozen),
        ]
        tenths = self.throughput.first_and_last_tenth()
        if tenths is not None:
            first, last = tenths
            rows.append(SavingsRow(self.technique, "throughput, last vs first tenth of the run",
                                   f"{last:.0f} vs {first:.0f} samples/s", float(first / last), "first tenth's step time"))
        if self._cache is not None:
            cache = self._cache
            rows.append(SavingsRow(self.technique, "forwards through frozen blocks served from the cache",
                                   f"{cache.served} whole, {cache.served_in_part} in part, of {cache.forwards} "
                                   f"({cache.nbytes / 2**20:.1f} MiB cached)"))
        return rows

    # -- state --------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "previous_norms": list(self.previous_norms), "pending": self._pending,
                "frozen_param_steps": self.frozen_param_steps, "counted_steps": self.counted_steps,
                "last_step": self._last_step, "check_deferred": self._check_deferred,
                "joined_modules": list(self._joined_modules),
                "joined_params": list(self._joined_params)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = int(state_dict["frozen"])  # applied in on_fit_start, before the optimizer state loads
        self.previous_norms = [float(v) for v in state_dict["previous_norms"]]
        self._pending = int(state_dict["pending"])
        self.frozen_param_steps = float(state_dict["frozen_param_steps"])
        self.counted_steps = int(state_dict["counted_steps"])
        self._last_step = int(state_dict["last_step"])
        self._check_deferred = bool(state_dict.get("check_deferred", False))
        # joined to block 0 again in on_fit_start, before the frozen set (older checkpoints: nothing joined)
        self._restored_join = ([str(n) for n in state_dict.get("joined_modules", [])],
                               [str(n) for n in state_dict.get("joined_params", [])])


_GRAD_MODES: list[bool] = []


def _enter_no_grad(module: nn.Module, args) -> None:
    _GRAD_MODES.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def _exit_no_grad(module: nn.Module, args, output) -> None:
    torch.set_grad_enabled(_GRAD_MODES.pop() if _GRAD_MODES else True)


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            size = _batch_size(item)
            if size:
                return size
    return 0


__all__ = [
    "Block",
    "ProgressiveFreezing",
    "adaptive_frozen_prefix",
    "blocks_from_patterns",
    "discover_blocks",
    "freezeout_lr_factor",
    "freezeout_times",
    "linear_frozen_count",
    "remove_from_optimizer",
]
