"""Which weights a technique touches.

Every technique picks its weights here, with one set of rules:

* **Patterns** name modules by fully-qualified name (FQN). A pattern is a glob anchored at a
  module boundary: ``"blocks.*.mlp.fc1"`` matches ``blocks.0.mlp.fc1`` and also
  ``model.blocks.0.mlp.fc1`` (the same network stored as ``self.model`` in a LightningModule).
  ``*`` crosses dots. Naming a module names everything inside it: ``exclude=["blocks.0"]``
  leaves out every layer of the first block. A pattern starting with ``"re:"`` is a regular expression that must match
  the whole FQN. ``"all-linear"`` means every linear layer except the output head (the
  Hugging Face PEFT/GaLore meaning).
* **Kinds** say which module types carry a weight the technique can handle: ``"linear"``
  (``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D``, whose weight is stored transposed),
  ``"conv"`` (``nn.Conv1d/2d/3d`` and transposed convolutions) and ``"embedding"``.
* **Default exemptions**, applied only when no ``include`` patterns are given: embeddings,
  anything tied to an embedding (GPT-2's ``lm_head``), the stem (the first targetable module if
  it is a convolution, or any module named ``patch_embed``/``stem``/``conv_in``) and the output
  head (the last targetable module, or any named ``head``/``lm_head``/``classifier``/``conv_out``).
  Biases and norms are never targets: only weights of two or more dimensions are.
* **Tied parameters** are one target: weights are deduplicated by identity, and the other
  module names that share the parameter are kept as ``aliases``.

Mistakes fail early: a pattern that matches no module raises ``ValueError`` naming the argument
and listing the closest module names; so does a selection that ends up empty.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

Patterns = Union[str, Sequence[str], None]


KINDS: tuple[str, ...] = ("linear", "conv", "embedding")


ALL_LINEAR = "all-linear"


_STEM_NAMES = ("patch_embed", "stem", "conv_in")


_HEAD_NAMES = ("head", "lm_head", "classifier", "conv_out")


def module_kind(module: nn.Module) -> Optional[str]:
    """The kind of ``module`` (``"linear"``, ``"conv"``, ``"embedding"``) or None if it has none."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D is a linear layer with weight (in, out); checked by name so that
    # transformers stays optional.
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2


@dataclass(frozen=True, eq=False)
class Target:
    """One weight a technique touches.

    Attributes:
        name: FQN of the module that owns the weight (the first one found, for tied weights).
        module: that module.
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        aliases: FQNs of other modules sharing the same parameter (tied weights).
    """

    name: str
    module: nn.Module
    kind: str
    aliases: tuple[str, ...] = ()

    @property
    def param(self) -> nn.Parameter:
        return self.module.weight

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def transposed(self) -> bool:
        """True when the weight is stored (in, out) — GPT-2's Conv1D — instead of (out, in)."""
        return _is_hf_conv1d(self.module)

    @property
    def reduction_dim(self) -> int:
        """The dimension summed over in the forward pass (input features/channels)."""
        return 0 if self.transposed else 1

    def matrix(self, tensor: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tensor`` (default: the weight) viewed as an (out, in·kernel) matrix."""
        t = self.param if tensor is None else tensor
        if self.transposed:
            t = t.t()
        return t.reshape(t.shape[0], -1)

    def __repr__(self) -> str:
        alias = f", aliases={list(self.aliases)}" if self.aliases else ""
        return f"Target({self.name!r}, {self.kind}, {tuple(self.param.shape)}{alias})"


def fqn_matches(name: str, pattern: str) -> bool:
    """Whether module FQN ``name`` matches ``pattern`` (glob at a module boundary, or ``re:``)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def in_subtree(name: str, pattern: str) -> bool:
    """Whether ``name`` or one of its ancestors matches ``pattern``."""
    parts = name.split(".")
    return any(fqn_matches(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _check_patterns(patterns: list[str], argument: str) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"`{argument}` must be a list of non-empty module-name patterns; got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"`{argument}` pattern {pattern!r} is not a valid regular expression: {err}") from None


def validate_patterns(patterns: Patterns, argument: str) -> list[str]:
    """Check the form of ``patterns`` (call from a callback's ``__init__``); returns them as a list."""
    items = _as_list(patterns)
    _check_patterns(items, argument)
    return items


def no_match_message(pattern: str, names: Sequence[str], argument: str, what: str = "module") -> str:
    """The error for a pattern that matches nothing: the closest names, else a sample of names."""
    literal = pattern[3:] if pattern.startswith("re:") else pattern
    close = difflib.get_close_matches(literal, names, n=5, cutoff=0.4)
    if not close:
        stem = re.split(r"[*?\[]", literal, maxsplit=1)[0].rstrip(".")
        close = [n for n in names if stem and stem in n][:5]
    hint = f"Close names: {', '.join(close)}" if close else f"Some names: {', '.join(list(names)[:8])}"
    return f"`{argument}` pattern {pattern!r} matches no {what} of the model. {hint}"


def match_modules(model: nn.Module, patterns: Patterns, argument: str = "modules") -> list[tuple[str, nn.Module]]:
    """Modules whose FQN matches any pattern, in registration order (each module once).

    Raises ``ValueError`` naming ``argument`` if a pattern matches nothing.
    """
    items = validate_patterns(patterns, argument)
    named = [(n, m) for n, m in model.named_modules() if n]
    names = [n for n, _ in named]
    for pattern in items:
        if not any(fqn_matches(n, pattern) for n in names):
            raise ValueError(no_match_message(pattern, names, argument))
    return [(n, m) for n, m in named if any(fqn_matches(n, p) for p in items)]


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module, str, tuple[str, ...]]]:
    """Every (name, module, kind, aliases) with a targetable weight, deduplicated by identity."""
    first: dict[int, int] = {}
    found: list[list] = []
    for name, module in model.named_modules(remove_duplicate=False):
        kind = module_kind(module)
        if kind is None:
            continue
        key = id(module.weight)
        if key in first:
            entry = found[first[key]]
            if name != entry[0] and name not in entry[3]:
                entry[3].append(name)
            continue
        first[key] = len(found)
        found.append([name, module, kind, []])
    return [(n, m, k, tuple(a)) for n, m, k, a in found]


def default_exemptions(model: nn.Module) -> dict[str, str]:
    """Module FQN → why it is exempt by default (embedding, tied, stem, head)."""
    cands = _candidates(model)
    reasons: dict[str, str] = {}
    for name, module, kind, aliases in cands:
        names = (name, *aliases)
        if kind == "embedding":
            reasons[name] = "embedding"
        elif any(module_kind(model.get_submodule(a)) == "embedding" for a in aliases):
            reasons[name] = "tied to an embedding"
        elif any(fqn_matches(n, p) or fqn_matches(n, p + ".*") for n in names for p in _STEM_NAMES):
            reasons[name] = "stem / patch embedding"
        elif any(fqn_matches(n, p) or fqn_matches(n, p + ".*") for n in names for p in _HEAD_NAMES):
            reasons[name] = "output head"
    # Structural rules, by registration order of every name (aliases included, so that GPT-2's
    # tied lm_head, registered last, counts as the head and no block layer is exempted instead).
    owners = [(n, c) for c in cands for n in (c[0], *c[3])]
    if owners:
        order = {n: i for i, (n, _) in enumerate(model.named_modules(remove_duplicate=False))}
        owners.sort(key=lambda item: order[item[0]])
        first = owners[0][1]
        if first[2] == "conv":
            reasons.setdefault(first[0], "stem / patch embedding")
        reasons.setdefault(owners[-1][1][0], "output head")
    return reasons


def select_targets(
    model: nn.Module,
    include: Patterns = None,
    exclude: Patterns = None,
    kinds: Iterable[str] = KINDS,
    include_argument: str = "include",
    exclude_argument: str = "exclude",
) -> list[Target]:
    """Select the weights a technique touches (see the module docstring for the rules).

    Args:
        model: the model (a LightningModule or any ``nn.Module``).
        include: patterns of modules to target; None targets every module of ``kinds`` except the
            default exemptions. ``"all-linear"`` may stand among the patterns.
        exclude: patterns of modules never to target.
        kinds: module kinds the technique supports (subset of ``("linear", "conv", "embedding")``).
        include_argument, exclude_argument: argument names used in error messages.

    Returns:
        Targets in registration order, one per distinct parameter.
    """
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown module kinds {unknown}; expected a subset of {list(KINDS)}")
    includes = validate_patterns(include, include_argument)
    excludes = validate_patterns(exclude, exclude_argument)
    cands = _candidates(model)
    all_names = [n for n, _ in model.named_modules() if n]
    exempt = default_exemptions(model)

    def names_of(entry) -> tuple[str, ...]:
        return (entry[0], *entry[3])

    selected = []
    if not includes:
        selected = [c for c in cands if c[2] in kinds and c[0] not in exempt]
    else:
        for pattern in includes:
            if pattern == ALL_LINEAR:
                continue
            if not any(fqn_matches(n, pattern) for n in all_names):
                raise ValueError(no_match_message(pattern, all_names, include_argument))
            if not any(any(in_subtree(n, pattern) for n in names_of(c)) and c[2] in kinds for c in cands):
                matched = [n for n in all_names if fqn_matches(n, pattern)][:5]
                raise ValueError(
                    f"`{include_argument}` pattern {pattern!r} matches {', '.join(matched)}, but none of them has a"
                    f" weight this technique can handle (kinds: {list(kinds)}; biases and norm weights never are)"
                )
        for c in cands:
            if c[2] not in kinds:
                continue
            by_glob = any(in_subtree(n, p) for n in names_of(c) for p in includes if p != ALL_LINEAR)
            all_linear = ALL_LINEAR in includes and c[2] == "linear" and c[0] not in exempt
            if by_glob or all_linear:
                selected.append(c)
    for pattern in excludes:
        if not any(fqn_matches(n, pattern) for n in all_names):
            raise ValueError(no_match_message(pattern, all_names, exclude_argument))
    selected = [c for c in selected if not any(in_subtree(n, p) for n in names_of(c) for p in excludes)]
    if not selected:
        raise ValueError(
            f"no weights selected: `{include_argument}`={includes or None} and `{exclude_argument}`={excludes or None}"
            f" leave nothing of kinds {list(kinds)} to target"
            + ("" if includes else f" (default exemptions: {sorted(exempt)})")
        )
    return [Target(name, module, kind, aliases) for name, module, kind, aliases in selected]


def rebind_targets(targets: Sequence[Target], model: nn.Module) -> list[Target]:
    """``targets`` looked up again by module name in ``model``: whatever ran since they were selected
    (FSDP2's ``fully_shard`` in ``configure_model`` replaces every parameter; a ``configure_model``
    may even build modules anew) leaves each target pointing at the module and weight now there."""
    return [Target(t.name, model.get_submodule(t.name), t.kind, t.aliases) for t in targets]


def target_summary(targets: Sequence[Target]) -> str:
    """One line per target: name, kind, shape — for logs and error messages."""
    return "\n".join(f"{t.name} ({t.kind}, {tuple(t.param.shape)})" for t in targets)
