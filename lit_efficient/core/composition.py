"""How our callbacks combine in one Trainer: what each owns, what is refused, and when each acts.

Any combination either works or is refused in ``setup`` (by the last of our callbacks, once all
of them have chosen their targets) with a message saying why:

* a weight belongs to at most one sparsity technique (GraNet, RigL, SET, NMSparsity, SparCL):
  two masks on one weight would fight; give them disjoint ``include``/``exclude``;
* the order of the training samples belongs to at most one planner (InfoBatch, SparCL's data
  removal): each rebuilds the training dataloader around its own sampler.

Two instances of one stateful callback (two ProgressiveFreezing, two GaLore ...) are refused by
Lightning itself: they would share one checkpoint state key. Stateless ones may repeat on
disjoint layers (NMSparsity 2:4 on attention and 1:4 on the MLP).

Within one optimizer step the callbacks act in this order, whatever the order of
``trainer.callbacks`` (each stage touches state no other stage reads, or reads it at a point
where every callback sees the same value):

1. before the forward: the frozen prefix is fixed (ProgressiveFreezing changed it at the end of
   the previous step); frozen blocks run without building a graph; NMSparsity's forward uses the
   N:M-masked weights.
2. after ``training_step``: LossReweighting, InfoBatch and SparCL multiply their per-sample
   multipliers (a product, so their order does not matter) into the loss before backward
   (:mod:`lit_efficient.data.sample_losses`).
3. before the optimizer step (gradients unscaled and DDP-averaged): sparse callbacks read dense
   gradients for growth and note which of their layers are frozen; SparCL masks gradients;
   NMSparsity adds its decay; adaptive freezing measures gradient norms.
4. the optimizer step: GaLore's projected update, when GaLore converted the optimizer; right
   after it (an optimizer step hook, before any callback's ``on_train_batch_end``) FreezeOut's LR
   annealing shrinks the step of the blocks nearing their freeze time.
5. after the step: masks are applied to weights and optimizer state, then mask updates run —
   only on layers that were trainable in this step (frozen layers keep their masks and weights
   bit-identical); a layer whose mask grew restarts its GaLore state, since projected moments
   cannot be zeroed entry by entry; ProgressiveFreezing then freezes blocks due for the next step.

Every schedule runs on one clock: full-data optimizer steps
(:func:`lit_efficient.core.clock.run_position`). InfoBatch's pruned epochs are shorter, and it
advances step-wise LR schedulers to keep them on that clock; the other callbacks read the same
position, so ``stop=0.75`` or FreezeOut's freeze times still fall at the same fraction of the
epochs, and the freezing schedule completes although the run takes fewer optimizer steps.
Intervals (``update_every="50st"``, GaLore's ``update_proj_gap``) stay in real optimizer steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable

if TYPE_CHECKING:  # pragma: no cover
    from lit_efficient.core.callback import EfficientCallback


@dataclass(frozen=True)
class Claim:
    """Something a callback must own alone.

    Attributes:
        key: identity of the resource (two callbacks with equal keys conflict).
        what: the resource in words, for the refusal message (``"the weights of blocks.0.fc1"``).
        why: why it cannot be shared.
    """

    key: Hashable
    what: str
    why: str


def weight_claim(name: str, param) -> Claim:
    """The claim of a sparsity technique on one weight."""
    return Claim(("weights", id(param)), f"the weights of {name}",
                 "two masks on one weight would fight; give the callbacks disjoint `include`/`exclude`")


SAMPLE_ORDER = Claim("sample-order", "the order of the training samples",
                     "each rebuilds the training dataloader around its own sampler")


def check_composition(callbacks: list["EfficientCallback"]) -> None:
    """Refuse combinations of our callbacks that cannot work together (see the module docstring)."""
    owners: dict[Hashable, tuple["EfficientCallback", Claim]] = {}
    for callback in callbacks:
        for claim in callback.claims():
            owner, _ = owners.setdefault(claim.key, (callback, claim))
            if owner is not callback:
                raise ValueError(f"{type(owner).__name__} and {type(callback).__name__} both need {claim.what}: "
                                 f"{claim.why}")
