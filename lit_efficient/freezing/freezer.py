"""The mechanics of freezing a block: its parameters leave the optimizer with their state freed,
it runs without building a graph, and what feeds it is found from the autograd graph.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_efficient.core.protocols import PerParameterOptions


def remove_from_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Remove ``params`` (by identity) from every param group and free their state; returns how many
    were found. Groups stay (possibly empty) so LR schedulers keep matching them."""
    ids = {id(p) for p in params}
    removed = 0
    for group in optimizer.param_groups:
        keep = [id(p) not in ids for p in group["params"]]
        removed += keep.count(False)
        aligned = optimizer.per_parameter_options if isinstance(optimizer, PerParameterOptions) else ()
        for key in ("params", *aligned):  # lists aligned with the params (GaLore's flags) shrink alongside
            if isinstance(group.get(key), list):
                group[key] = [v for v, k in zip(group[key], keep) if k]
    for p in params:
        optimizer.state.pop(p, None)
    return removed


def leaves_behind(tensors: list[torch.Tensor]) -> set[int]:
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


_GRAD_MODES: list[bool] = []


def enter_no_grad(module: nn.Module, args) -> None:
    _GRAD_MODES.append(torch.is_grad_enabled())
    torch.set_grad_enabled(False)


def exit_no_grad(module: nn.Module, args, output) -> None:
    torch.set_grad_enabled(_GRAD_MODES.pop() if _GRAD_MODES else True)
