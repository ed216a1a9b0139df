"""Block discovery: how a model is cut into blocks in forward order for freezing.

Block 0 carries everything upstream of the first block (patch embedding and class/position
tokens, token embeddings, a UNet's ``conv_in`` and time embedding). Known layouts (timm ViTs,
Hugging Face decoders and encoders, diffusers UNets) are recognised; otherwise the longest
homogeneous stack of children is taken; ``blocks`` patterns name them explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from lit_efficient.core.targets import fqn_matches, no_match_message


@dataclass
class Block:
    """One unit of freezing: modules (run without a graph once frozen) and the parameters frozen."""

    name: str
    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    stem: int = 0  # leading modules that feed the block's stack (embeddings): always run, never cached

    def num_params(self) -> int:
        return sum(p.numel() for _, p in self.params)

    def rebind(self, model: nn.Module) -> None:
        """Look the modules and parameters up again by name: FSDP2's ``fully_shard`` (in
        ``configure_model``, after the blocks were found) replaces every parameter with a sharded one."""
        self.modules = [(n, model.get_submodule(n)) for n, _ in self.modules]
        self.params = [(n, model.get_parameter(n)) for n, _ in self.params]


# -- block discovery ----------------------------------------------------------------------------
def _known_layout(module: nn.Module) -> Optional[tuple[list[str], list[str], list[str]]]:
    """(stem modules, stem parameters, blocks) of a recognised architecture, names relative to it."""
    has = lambda *names: all(getattr(module, n, None) is not None for n in names)  # noqa: E731
    if has("patch_embed", "blocks") and isinstance(module.blocks, nn.Sequential):  # timm ViT family
        tokens = ("cls_token", "reg_token", "pos_embed")
        params = [n for n in tokens if isinstance(getattr(module, n, None), nn.Parameter)]
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
    (the freezing callbacks' prefix check, :class:`~lit_efficient.freezing.base.BlockFreezing`).
    """
    for prefix, module in model.named_modules():
        layout = _known_layout(module)
        if layout is None:
            continue
        stem_modules, stem_params, block_names = layout
        blocks = [Block(_join(prefix, n), [(_join(prefix, n), module.get_submodule(n))]) for n in block_names]
        first = blocks[0]
        stem = [(_join(prefix, n), getattr(module, n)) for n in stem_modules
                if isinstance(getattr(module, n, None), nn.Module)]
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
        found = [(n, m) for n, m in found if not within(n, taken)]
        found = [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found)]
        if found:
            for n, m in found:
                blocks.append(Block(n, [(n, m)]))
                taken.append(n)
            continue
        params = [(n, p) for n, p in named_params if fqn_matches(n, pattern)]
        if not params:
            names = [n for n, _ in named_modules] + [n for n, _ in named_params]
            raise ValueError(no_match_message(pattern, names, "blocks"))
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


def within(name: str, modules: list[str]) -> bool:
    """``name`` is one of ``modules`` or lies inside one."""
    return any(name == m or name.startswith(m + ".") for m in modules)
