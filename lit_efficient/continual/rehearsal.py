"""Rehearsal for continual learning: experience replay and DER++ (Buzzega et al., "Dark Experience
for General Continual Learning", NeurIPS 2020, https://arxiv.org/abs/2004.07211).

A :class:`ReservoirBuffer` plus :func:`rehearsal_loss`, usable from any ``training_step``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_efficient.core.checks import check_int
from lit_efficient.core.device import host_int, pinned

Rehearsal = Literal["none", "er", "derpp"]


# -- rehearsal ----------------------------------------------------------------------------------------
class ReservoirBuffer:
    """A fixed-size memory of past samples filled by reservoir sampling (every sample seen so far
    has the same chance ``capacity / seen`` of being in it), with optional stored logits (DER).

    Args:
        capacity: number of samples kept (≥ 1).
        seed: seed of the reservoir draws and of :meth:`sample`.

    Each DDP rank keeps its own buffer of the samples it saw. State (tensors, counters, generator)
    goes through :meth:`state_dict`, loadable with ``torch.load(weights_only=True)``; save it from
    the module's ``on_save_checkpoint``.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        check_int(capacity, "capacity", 1)
        self.capacity = capacity
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)
        self.examples: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def slots(self, count: int) -> list[int]:
        """Reservoir slots for the next ``count`` samples (-1: not stored); advances ``seen``.
        Drawn on the host (a CPU generator): nothing waits for the device."""
        out = [-1] * count
        for i in range(count):
            if self.seen < self.capacity:
                out[i] = self.seen
            else:
                j = host_int(torch.randint(0, self.seen + 1, (1,), generator=self.generator))
                if j < self.capacity:
                    out[i] = j
            self.seen += 1
        return out

    @torch.no_grad()
    def add(self, examples: Tensor, labels: Tensor, logits: Optional[Tensor] = None) -> None:
        """Offer a batch to the reservoir."""
        if self.examples is None:
            self.examples = torch.zeros((self.capacity, *examples.shape[1:]), dtype=examples.dtype,
                                        device=examples.device)
            self.labels = torch.zeros((self.capacity, *labels.shape[1:]), dtype=labels.dtype, device=labels.device)
            if logits is not None:
                self.logits = torch.zeros((self.capacity, *logits.shape[1:]), dtype=torch.float32, device=logits.device)
        assert self.labels is not None
        slots = self.slots(examples.shape[0])
        source = [i for i, slot in enumerate(slots) if slot >= 0]
        if not source:
            return
        # page-locked copies: the indices reach the device without waiting for its stream
        target = pinned(torch.tensor([slots[i] for i in source])).to(self.examples.device, non_blocking=True)
        source = pinned(torch.tensor(source)).to(examples.device, non_blocking=True)
        self.examples[target] = examples.detach()[source]
        self.labels[target] = labels.detach()[source]
        if self.logits is not None and logits is not None:
            self.logits[target] = logits.detach().float()[source]

    def sample(self, count: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``count`` stored samples drawn without replacement (fewer if fewer are stored)."""
        if len(self) == 0 or self.examples is None or self.labels is None:
            raise ValueError("the rehearsal buffer is empty")
        chosen = torch.randperm(len(self), generator=self.generator)[: min(count, len(self))].to(self.examples.device)
        logits = self.logits[chosen] if self.logits is not None else None
        return self.examples[chosen], self.labels[chosen], logits

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "seen": self.seen, "generator": self.generator.get_state(),
                "examples": self.examples, "labels": self.labels, "logits": self.logits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"the checkpoint's rehearsal buffer holds {state['capacity']} samples, "
                             f"this one {self.capacity}")
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        self.examples, self.labels, self.logits = state["examples"], state["labels"], state["logits"]


def rehearsal_loss(forward: Callable[[Tensor], Tensor], buffer: ReservoirBuffer, batch_size: int,
                   method: Rehearsal = "derpp", alpha: float = 0.1, beta: float = 0.5) -> Optional[Tensor]:
    """The replay term to add to the current batch's loss (None while the buffer is empty).

    * ``"er"`` (experience replay): cross-entropy on a batch of stored samples.
    * ``"derpp"`` (DER++): ``alpha · MSE(f(x'), z')`` on stored logits ``z'`` plus
      ``beta · CE(f(x''), y'')`` on a second stored batch. Defaults are the DER++ paper's for
      Split CIFAR-10 with a 200-sample buffer (α = 0.1, β = 0.5).
    * ``"none"``: no replay.
    """
    if method not in ("none", "er", "derpp"):
        raise ValueError(f"`method` must be 'none', 'er' or 'derpp'; got {method!r}")
    if method == "none" or len(buffer) == 0:
        return None
    if method == "er":
        x, y, _ = buffer.sample(batch_size)
        return F.cross_entropy(forward(x), y)
    x1, _, z1 = buffer.sample(batch_size)
    if z1 is None:
        raise ValueError("DER++ replays logits: add them to the buffer (`buffer.add(x, y, logits)`)")
    x2, y2, _ = buffer.sample(batch_size)
    return alpha * F.mse_loss(forward(x1).float(), z1) + beta * F.cross_entropy(forward(x2), y2)
