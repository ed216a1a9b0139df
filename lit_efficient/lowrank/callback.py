"""GaLore for any LightningModule: the module's own AdamW, rebuilt as GaLoreAdamW.

The module keeps its ``configure_optimizers``. At ``setup`` the callback wraps it so that every
``torch.optim.AdamW``/``Adam`` it returns is rebuilt as :class:`GaLoreAdamW` with the same
parameter groups and hyperparameters; the targeted matrices of each group are marked
``projected``, so groups — and with them every learning-rate scheduler's per-group lists — stay
as they were, and the schedulers are rebound to the new optimizer. Lightning then checkpoints
and restores the GaLore state like any optimizer's (a resume keeps the same subspace).

Targets come from the shared ``targets.py`` rules (``"all-linear"``, globs, ``re:`` regexes);
embeddings, the output head, norms and biases stay on plain AdamW by default.

Gradient accumulation, clipping (Lightning clips the full gradient before the optimizer step,
hence before projection), bf16 mixed precision and DDP (gradients are averaged before the step,
so every rank computes the same basis) need nothing special. The per-layer mode
(``layerwise=True``) steps each matrix inside backward as soon as its gradient is complete and
frees it; it cannot see accumulated, clipped or DDP-averaged gradients and is refused with them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from typing_extensions import override

from lit_efficient.lowrank.optim import GaLoreAdamW, check_galore_group, state_bytes
from lit_efficient.lowrank.projector import PROJ_TYPES, PROJECTIONS, ProjType, Projection
from lit_efficient.monitor import EfficientCallback, SavingsRow, step_logs_due
from lit_efficient.schedules import check_bool, check_int
from lit_efficient.targets import refuse_sharded_strategies, select_targets, validate_patterns

_CONVERTIBLE = (torch.optim.AdamW, torch.optim.Adam)


class GaLore(EfficientCallback):
    r"""Train the module's targeted weight matrices with GaLore-projected AdamW moments.

    Args:
        rank: rank r of the projection (> 0, at most the smaller dimension of every target;
            the paper uses d_model/4 to d_model/2 for pre-training, 4–8 for fine-tuning).
        update_proj_gap: optimizer steps between basis refreshes (default 200).
        scale: α, the update scale (default 0.25 for pre-training; 2–4 for fine-tuning).
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"``, ``"right"`` or ``"full"``.
        projection: ``"svd"`` (default), ``"randomized_svd"`` or ``"random"`` (APOLLO-style).
        target_modules: module patterns to project (default ``"all-linear"``: every Linear but the
            head and embedding-tied layers); a list of globs, names or ``re:`` regexes.
        exclude: module patterns never to project.
        fira: add back the out-of-subspace gradient, scaled, with Fira's norm-growth limiter.
        eight_bit: keep the moments blockwise-quantized to 8 bits (bitsandbytes).
        layerwise: step each matrix inside backward and free its gradient (per-layer mode);
            refused with gradient accumulation, gradient clipping, multi-process training and a
            GradScaler (16-mixed: its overflow steps could not be skipped).
        seed: seed of the random projections (identical on every rank).

    Logged under ``efficient/galore/``: ``optimizer_state_bytes`` and ``adamw_state_bytes`` (what
    AdamW would hold for the same parameters) and their ``state_ratio``, ``refresh_seconds``
    (cumulative basis computation time), ``subspace_overlap`` (mean squared cosine of the principal
    angles between consecutive bases, 1 = unchanged) at refreshes, and ``rank``.
    """

    technique = "galore"

    def __init__(
        self,
        rank: int = 128,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: ProjType = "std",
        projection: Projection = "svd",
        target_modules: Union[str, list[str], None] = "all-linear",
        exclude: Optional[list[str]] = None,
        fira: bool = False,
        eight_bit: bool = False,
        layerwise: bool = False,
        seed: int = 0,
    ) -> None:
        self.group_options = {"rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type,
                              "projection": projection, "fira": check_bool(fira, "fira"),
                              "eight_bit": check_bool(eight_bit, "eight_bit"), "seed": check_int(seed, "seed")}
        check_galore_group({**self.group_options, "params": []})  # ValueErrors naming the argument
        if eight_bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("`eight_bit=True` needs bitsandbytes (`pip install bitsandbytes`)") from err
        self.target_modules = validate_patterns(target_modules, "target_modules") or None
        self.exclude = validate_patterns(exclude, "exclude") or None
        self.layerwise = check_bool(layerwise, "layerwise")
        self.targets: list = []
        self.optimizers: list[GaLoreAdamW] = []
        self._hooks: list = []
        self._original_configure = None
        self._seen_refreshes = 0

    # -- converting the module's optimizer --------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, "GaLore", "the projection needs each whole gradient matrix")
        if self.layerwise:
            problems = []
            if trainer.accumulate_grad_batches > 1:
                problems.append(f"accumulate_grad_batches={trainer.accumulate_grad_batches}")
            if trainer.gradient_clip_val:
                problems.append(f"gradient_clip_val={trainer.gradient_clip_val}")
            if trainer.world_size > 1 or isinstance(trainer.strategy, DDPStrategy):
                problems.append(f"{type(trainer.strategy).__name__} with {trainer.world_size} process(es)")
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                problems.append("a GradScaler (16-mixed)")
            if problems:
                raise ValueError("GaLore(layerwise=True) steps each matrix inside backward, before gradients could be "
                                 "accumulated, clipped, averaged across processes or unscaled and checked for an fp16 "
                                 f"overflow: it cannot run with {', '.join(problems)}. Use layerwise=False (or bf16-mixed).")
            if not pl_module.automatic_optimization:
                raise ValueError("GaLore(layerwise=True) needs automatic optimization")
        self.targets = select_targets(pl_module, self.target_modules, self.exclude, kinds=("linear",),
                                      include_argument="target_modules")
        rank = self.group_options["rank"]
        small = [f"{t.name} {tuple(t.param.shape)}" for t in self.targets if rank > min(t.param.shape)]
        if small:
            raise ValueError(f"`rank`={rank} is larger than these targeted matrices allow: {', '.join(small)}; "
                             "lower `rank` or leave them out with `exclude`")
        self._original_configure = pl_module.configure_optimizers
        original = self._original_configure

        def configure_optimizers() -> Any:
            return self.convert(original())

        pl_module.configure_optimizers = configure_optimizers
        super().setup(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            pl_module.__dict__.pop("configure_optimizers", None)
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    def convert(self, configured: Any) -> Any:
        """``configure_optimizers``' return value with every Adam/AdamW rebuilt as GaLoreAdamW."""
        replaced: dict[int, GaLoreAdamW] = {}

        def walk(obj: Any) -> Any:
            if isinstance(obj, torch.optim.Optimizer):
                if id(obj) not in replaced:
                    replaced[id(obj)] = self.convert_optimizer(obj)
                return replaced[id(obj)]
            if isinstance(obj, dict):
                return {k: walk(v) for k, v in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(walk(x) for x in obj)
            return obj

        converted = walk(configured)
        if not replaced:
            raise ValueError("GaLore found no optimizer in what `configure_optimizers` returned")

        def rebind(obj: Any) -> None:
            if isinstance(obj, (LRScheduler, ReduceLROnPlateau)):
                new = replaced.get(id(obj.optimizer))
                if new is not None:
                    obj.optimizer = new
                    _mark_step_tracked(new)
                for inner in getattr(obj, "_schedulers", []):  # SequentialLR, ChainedScheduler
                    rebind(inner)
            elif isinstance(obj, dict):
                for v in obj.values():
                    rebind(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    rebind(v)

        rebind(converted)
        self.optimizers = list(replaced.values())
        return converted

    def convert_optimizer(self, optimizer: torch.optim.Optimizer) -> GaLoreAdamW:
        if isinstance(optimizer, GaLoreAdamW):
            return optimizer
        if not isinstance(optimizer, _CONVERTIBLE):
            raise ValueError(f"GaLore rebuilds an AdamW/Adam optimizer; `configure_optimizers` returned "
                             f"{type(optimizer).__name__}. Return torch.optim.AdamW, or build GaLoreAdamW yourself.")
        if isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW) and any(
                g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False) for g in optimizer.param_groups):
            rank_zero_warn("GaLore: the module's Adam has L2 weight decay; GaLoreAdamW decays decoupled (AdamW-style)")
        for group in optimizer.param_groups:
            for flag in ("amsgrad", "maximize"):
                if group.get(flag):
                    raise ValueError(f"GaLore cannot convert an optimizer with `{flag}=True`")
        targeted = {id(t.param) for t in self.targets}
        groups = []
        for group in optimizer.param_groups:
            new = {k: v for k, v in group.items()
                   if k not in ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                                "decoupled_weight_decay")}
            new.update(self.group_options)
            new["projected"] = [id(p) in targeted for p in group["params"]]
            groups.append(new)
        defaults = optimizer.defaults
        converted = GaLoreAdamW(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                                weight_decay=defaults["weight_decay"])
        if self.layerwise:
            self._install_layerwise(converted)
        return converted

    def _install_layerwise(self, optimizer: GaLoreAdamW) -> None:
        for group in optimizer.param_groups:
            for p, flag in zip(group["params"], group["projected"]):
                if not p.requires_grad:
                    continue

                def hook(param: torch.Tensor, group: dict = group, flag: bool = flag) -> None:
                    if param.grad is not None:
                        optimizer.step_param(param, group, flag)
                        param.grad = None  # the full gradient is freed as soon as it is used

                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    # -- reporting --------------------------------------------------------------------------------

    def adamw_state_bytes(self) -> int:
        """What torch AdamW would hold for the same parameters: two fp32 moments each."""
        return sum(2 * 4 * p.numel() for opt in self.optimizers for g in opt.param_groups for p in g["params"])

    def projected_state(self) -> tuple[int, int]:
        """(GaLore state bytes, AdamW state bytes) of the projected matrices alone."""
        galore = adamw = 0
        for opt in self.optimizers:
            params = [p for p, _ in opt.projected_params()]
            galore += state_bytes(opt, params)
            adamw += sum(2 * 4 * p.numel() for p in params)
        return galore, adamw

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizers:
            return
        refreshes = sum(o.refreshes for o in self.optimizers)
        overlaps = [v for o in self.optimizers for v in o.last_overlaps]
        if overlaps and refreshes != self._seen_refreshes:
            self.log_metrics(pl_module, {"subspace_overlap": sum(overlaps) / len(overlaps)})
        self._seen_refreshes = refreshes
        if step_logs_due(trainer):
            ours = sum(state_bytes(o) for o in self.optimizers)
            adamw = self.adamw_state_bytes()
            self.log_metrics(pl_module, {
                "optimizer_state_bytes": float(ours), "adamw_state_bytes": float(adamw),
                "state_ratio": ours / max(1, adamw), "rank": float(self.group_options["rank"]),
                "refresh_seconds": sum(o.refresh_seconds for o in self.optimizers),
            })

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if not self.optimizers:
            return []
        ours, adamw = sum(state_bytes(o) for o in self.optimizers), self.adamw_state_bytes()
        projected, projected_adamw = self.projected_state()
        return [
            SavingsRow(self.technique, "optimizer state", f"{ours / 2**20:.2f} MiB vs {adamw / 2**20:.2f} MiB AdamW",
                       ours / max(1, adamw), "AdamW"),
            SavingsRow(self.technique, "state of projected matrices",
                       f"{projected / 2**20:.2f} MiB, rank {self.group_options['rank']}",
                       projected / max(1, projected_adamw), "AdamW"),
        ]


def _mark_step_tracked(optimizer: torch.optim.Optimizer) -> None:
    """Let torch's schedulers see ``optimizer.step`` as tracked (they patch the optimizer they were
    built with; ours replaced it), so they do not warn that step order is wrong."""
    step = optimizer.step
    if getattr(step, "_wrapped_by_lr_sched", False):
        return

    def tracked(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True
        return step(*args, **kwargs)

    tracked._wrapped_by_lr_sched = True
    optimizer.step = tracked


__all__ = ["GaLore", "PROJECTIONS", "PROJ_TYPES"]
