"""What every masked-training callback does the same way (GraNet, RigL, SET, SparCL), with no schedule.

Targets are chosen in ``setup`` and get their mask buffers there, before Lightning restores a
checkpoint, so the state-dict keys never change. Initial masks are drawn at ``on_fit_start``
unless a checkpoint already brought them. After each optimizer step the masks are applied to
weights and optimizer state; after the steps :meth:`MaskedTraining.is_update_step` names, the
subclass's :meth:`MaskedTraining.update` changes them. Dense gradients for the update are read in
``on_before_optimizer_step``, where Lightning has unscaled them (AMP) and DDP has averaged them,
so every rank sees the same values and draws the same masks. An update due on an fp16 overflow
step runs after the next finite one.

When the masks change is the subclass's: a periodic schedule (``update_every``, the layer
``distribution`` of random initial masks) for the dynamic-sparse callbacks
(:class:`lit_efficient.sparsity.callback.SparseTrainingCallback`), each task's exploration epochs
for SparCL (:class:`lit_efficient.sparsity.sparcl.SparCL`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback, all_finite
from lit_efficient.core.checks import check_bool, check_fraction, check_int
from lit_efficient.core.clock import StepWatch
from lit_efficient.core.composition import Claim, weight_claim
from lit_efficient.core.distributed import refuse_sharded_strategies
from lit_efficient.core.figures import bar_chart, figure_writer, log_figure, pooled, thumbnails, width_for
from lit_efficient.core.gradient_travel import KeptEntries, Part
from lit_efficient.core.logs import log_histogram
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.shards import local
from lit_efficient.core.targets import select_targets, validate_patterns
from lit_efficient.sparsity.masks import ForwardFlops, SparseMasks

SPARSE_KINDS = ("linear", "conv", "embedding")


class MaskedTraining(EfficientCallback):
    """Base of the callbacks that train through weight masks (see the module docstring).

    Subclasses implement :meth:`initial_masks`, :meth:`is_update_step` and :meth:`update`.

    Args:
        sparsity: fraction of targeted weights that are zero (at the end), in [0, 1).
        include: module-name patterns to sparsify (default: every linear/conv layer except the
            stem and the head; see :mod:`lit_efficient.core.targets`).
        exclude: module-name patterns never to sparsify.
        seed: seed of every random choice (identical on all ranks).
        progress_bar: show ``sparsity=<fraction>`` in the progress bar (default True).

    At each mask update three TensorBoard figures (rank 0, matplotlib installed) show the layers:
    ``layer_density`` (each layer's density beside its target), ``mask_changes`` (positions pruned
    and regrown per layer by this update) and ``masks`` (thumbnails of a few masks, white = kept),
    with a histogram ``weight_magnitude`` of the active targeted weights.
    """

    supports_fsdp2: ClassVar[bool] = True  # masks sharded like the weights (``SparseMasks.shard_like_params``)

    def __init__(
        self,
        sparsity: float,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        self.sparsity = check_fraction(sparsity, "sparsity")
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        self.include = validate_patterns(include, "include") or None
        self.exclude = validate_patterns(exclude, "exclude") or None
        self.seed = check_int(seed, "seed")
        self.masks: Optional[SparseMasks] = None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.initialized = False
        self.updates = 0
        self._steps = StepWatch()
        self.flops: Optional[ForwardFlops] = None
        self.density_steps = 0.0  # sum over optimizer steps of the FLOPs ratio: training FLOPs
        self.counted_steps = 0
        self._grad_scores: Optional[list[torch.Tensor]] = None
        self._frozen_layers: Optional[list[bool]] = None
        self.update_deferred = False  # an update fell on an overflow step: it runs after the next finite one
        self._update_now = False

    # -- set-up -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, type(self).__name__, "masks could not be applied to whole weights",
                                  fsdp2=self.supports_fsdp2)
        targets = select_targets(pl_module, self.include, self.exclude, kinds=SPARSE_KINDS)
        self.masks = SparseMasks(targets, gradient_momentum=self.grows_by_momentum)
        self.flops = ForwardFlops(targets)
        super().setup(trainer, pl_module, stage)

    @override
    def claims(self) -> list[Claim]:
        return [weight_claim(t.name, t.param) for t in self.masks.targets] if self.masks is not None else []

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self.masks is not None
        self.masks.shard_like_params()  # FSDP2: after configure_model sharded the weights
        self.masks.recount()  # a checkpoint may have brought the masks
        if not self.initialized:
            self.masks.set_masks(self.initial_masks(), self.optimizer(trainer))
            self.initialized = True
        self.masks.apply(self.optimizer(trainer))
        if self.flops is not None and not self.flops.measured:
            self.flops.attach()

    @property
    def grows_by_momentum(self) -> bool:
        """Whether regrowth reads the momentum of the dense gradients, kept at every step (Sparse
        Momentum's criterion, GraNet's ``growth="momentum"``)."""
        return getattr(self, "growth", None) == "momentum"

    def initial_masks(self) -> list[torch.Tensor]:
        """The masks training starts from, one bool tensor per target (override)."""
        raise NotImplementedError

    @staticmethod
    def optimizer(trainer: "pl.Trainer") -> Optional[torch.optim.Optimizer]:
        return trainer.optimizers[0] if trainer.optimizers else None

    # -- every step ---------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Whether the masks change after optimizer step ``step`` (override; here: never)."""
        return False

    def update_window_open(self, step: int) -> bool:
        """Whether an update put off by an overflow step may still run after step ``step`` (override)."""
        return True

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        step = trainer.global_step + 1
        self._update_now, self._grad_scores = False, None
        if self.masks is not None and self.masks.tracks_momentum:
            # every step, inactive positions too; a step the GradScaler may skip adds nothing
            scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
            self.masks.accumulate_gradient_momentum(optimizer, all_finite(optimizer) if scaled else None)
        if self.update_deferred and not self.update_window_open(step):
            self.update_deferred = False  # the window of updates closed while it waited: dropped
        if self.masks is None or not (self.update_deferred or self.is_update_step(step)):
            return
        # no mask update from an fp16 overflow step (inf/NaN gradients, skipped by the GradScaler)
        self.update_deferred = not self.gradients_finite(optimizer, "the mask update", step)
        if self.update_deferred:
            return
        self._update_now = True
        # layers frozen for this step (ProgressiveFreezing) keep their masks; read here, before any
        # callback's on_train_batch_end could change the frozen set, so callback order does not matter
        self._frozen_layers = [not p.requires_grad for p in self.masks.params]
        # dense gradients, already unscaled (AMP) and averaged (DDP) here
        self._grad_scores = [
            torch.zeros_like(w) if p.grad is None else local(p.grad).detach().abs().clone()
            for p, w in zip(self.masks.params, self.masks.weights)
        ]

    def gradient_parts(self, trainer: "pl.Trainer") -> list[tuple[str, torch.Tensor, Part]]:
        """What the coming step reads of each target's gradient
        (:class:`lit_efficient.core.protocols.ReadsPartOfGradients`): the entries the mask keeps —
        the optimizer's update of active weights reads only those, and the masks zero the rest
        after the step — except on a mask update that regrows by gradient, which scores the inactive
        positions too, and on every step of growth by momentum, which averages them."""
        if self.masks is None or not self.initialized:
            return []
        step = trainer.global_step + 1
        update = self.update_deferred or self.is_update_step(step)
        if self.grows_by_momentum or (update and getattr(self, "growth", "random") != "random"):
            return [(self.technique, p, None) for p in self.masks.params]  # no index lists: the masks change next
        return [(self.technique, p, KeptEntries(indices)) for p, indices in zip(self.masks.params,
                                                                               self.masks.kept_indices())]

    @property
    def last_applied_step(self) -> int:
        """The optimizer step whose masks were applied last (-1 before the first)."""
        return self._steps.last

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx) -> None:
        if self.masks is None or not self._steps.stepped(trainer):
            return  # no optimizer step since the last call (gradient accumulation)
        if self.flops is not None and self.flops.measured:
            self.flops.detach()
        step = trainer.global_step
        optimizer = self.optimizer(trainer)
        self.masks.apply(optimizer)
        update, self._update_now = self._update_now, False
        by_gradient = update and getattr(self, "growth", None) == "gradient"
        self.account_step(dense_gradient=self.grows_by_momentum or by_gradient)  # momentum: every step
        if update:
            before = self.masks.count_changes()
            stats = self.update(step, optimizer, self._grad_scores)
            self._grad_scores = None
            self.updates += 1
            self.log_update(trainer, pl_module, stats, *self.masks.changes_since(before))
        self.show_progress(pl_module, "sparsity", round(self.masks.sparsity(), 3))

    def account_step(self, dense_gradient: bool = False) -> None:
        """Add this step's training FLOPs (fwd + bwd, relative to dense) to the running mean."""
        assert self.masks is not None
        ratio = self.flops.ratio(self.masks.layer_densities()) if self.flops is not None else self.masks.density()
        if dense_gradient:  # growth by gradient needs the dense weight gradient: 1 of the 3 matmuls
            ratio = (2 * ratio + 1) / 3
        self.density_steps += ratio
        self.counted_steps += 1

    def update(self, step: int, optimizer, grad_scores: Optional[list[torch.Tensor]]) -> dict[str, float]:
        """Change the masks after optimizer step ``step``; return statistics to log (override).

        Layers in :meth:`frozen_layers` must keep their masks."""
        raise NotImplementedError

    def frozen_layers(self) -> list[bool]:
        """Per target, whether it was frozen (no gradient, not in the optimizer) in this update's step."""
        assert self.masks is not None
        frozen = self._frozen_layers
        return list(frozen) if frozen is not None else [not p.requires_grad for p in self.masks.params]

    # -- reporting ----------------------------------------------------------------------------
    def target_densities(self) -> Optional[tuple[str, list[float]]]:
        """The per-layer densities this technique aims at, with their name (e.g. ERK's), drawn
        beside the actual ones (override; None: no per-layer target)."""
        return None

    def log_update(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stats: dict[str, float],
                   pruned: list[int], grown: list[int]) -> None:
        assert self.masks is not None
        densities = self.masks.layer_densities()
        metrics: dict[str, Any] = {"sparsity": self.masks.sparsity(), "updates": float(self.updates), **stats}
        metrics.update({f"layer_density/{name}": d for name, d in zip(self.masks.names(), densities)})
        if self.flops is not None and self.flops.measured:
            metrics["inference_flops_ratio"] = self.flops.ratio(densities)
            metrics["training_flops_ratio"] = self.density_steps / max(1, self.counted_steps)
        self.log_metrics(pl_module, metrics, event=True)
        if figure_writer(trainer) is not None:
            self.draw_layers(trainer, densities, pruned, grown)

    def draw_layers(self, trainer: "pl.Trainer", densities: list[float], pruned: list[int], grown: list[int]) -> None:
        """The figures and histogram of one mask update (rank 0; see the class docstring)."""
        assert self.masks is not None
        names, step = self.masks.names(), trainer.global_step
        wide = width_for(len(names))
        series = {"actual": densities}
        target = self.target_densities()
        if target is not None:
            series[target[0]] = target[1]
        top = max(max(values) for values in series.values())
        log_figure(trainer, self.technique, "layer_density", lambda f: bar_chart(
            f, names, series, f"{self.technique}: density per layer, update {self.updates} at step {step} "
            f"(sparsity {self.masks.sparsity():.1%})", "density (fraction of weights kept)",
            ylim=(0.0, min(1.05, 1.15 * top + 0.02)), line=("overall", self.masks.density())), width=wide)
        log_figure(trainer, self.technique, "mask_changes", lambda f: bar_chart(
            f, names, {"pruned": pruned, "regrown": grown},
            f"{self.technique}: update {self.updates} at step {step}: {sum(pruned)} pruned, {sum(grown)} regrown",
            "positions per layer", integer=True), width=wide)
        shown = self.thumbnail_layers()
        sharded = self.masks.group is not None
        log_figure(trainer, self.technique, "masks", lambda f: thumbnails(
            f, [(f"{names[i]} {densities[i]:.0%}", pooled(self.masks.masks[i])) for i in shown],
            f"{self.technique}: masks at step {step} (white = kept{', rows on rank 0' if sharded else ''}; "
            "averaged to at most 64x64 cells)"))
        active = [w.detach()[m].abs().float() for w, m in zip(self.masks.weights, self.masks.masks)]
        log_histogram(trainer, self.technique, "weight_magnitude", torch.cat([a.flatten() for a in active]), step)

    def thumbnail_layers(self, count: int = 4) -> list[int]:
        """Up to ``count`` targets spread over the network (first, last and between)."""
        assert self.masks is not None
        n = len(self.masks.targets)
        if n <= count:
            return list(range(n))
        return sorted({round(i * (n - 1) / (count - 1)) for i in range(count)})

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if self.masks is None:
            return []
        rows = [SavingsRow(self.technique, "weights of targeted layers", f"{self.masks.sparsity():.1%} zero")]
        if self.flops is not None and self.flops.measured:
            inference = self.flops.ratio(self.masks.layer_densities())
            training = self.density_steps / max(1, self.counted_steps)
            rows.append(SavingsRow(self.technique, "inference FLOPs (targeted layers)", f"{inference:.3f} of dense",
                                   inference))
            rows.append(SavingsRow(self.technique, "training FLOPs (targeted layers, fwd+bwd)",
                                   f"{training:.3f} of dense", training))
        return rows

    # -- state --------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "initialized": self.initialized,
            "updates": self.updates,
            "last_applied_step": self._steps.last,
            "generator": self.generator.get_state(),
            "density_steps": self.density_steps,
            "counted_steps": self.counted_steps,
            "flops": [f for f in self.flops.flops] if self.flops is not None else None,
            "update_deferred": self.update_deferred,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initialized = bool(state_dict["initialized"])
        self.updates = int(state_dict["updates"])
        self._steps.last = int(state_dict["last_applied_step"])
        self.generator.set_state(state_dict["generator"])
        self.density_steps = float(state_dict["density_steps"])
        self.counted_steps = int(state_dict["counted_steps"])
        self.update_deferred = bool(state_dict.get("update_deferred", False))
        if self.flops is not None and state_dict.get("flops") is not None:
            self.flops.flops = list(state_dict["flops"])
        if self.masks is not None:
            self.masks.recount()  # ModelParallelStrategy loads the masks after on_fit_start


__all__ = ["SPARSE_KINDS", "MaskedTraining"]
