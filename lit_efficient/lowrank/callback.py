"""GaLore for any LightningModule: the module's own AdamW, rebuilt as GaLoreAdamW.

The module keeps its ``configure_optimizers``. At ``setup`` the callback wraps it so that every
``torch.optim.AdamW``/``Adam`` it returns is rebuilt as :class:`GaLoreAdamW` with the same
parameter groups and hyperparameters; the targeted matrices of each group are marked
``projected``, so groups — and with them every learning-rate scheduler's per-group lists — stay
as they were, and the schedulers are rebound to the new optimizer. Lightning then checkpoints
and restores the GaLore state like any optimizer's (a resume keeps the same subspace).

Targets come from the shared ``targets.py`` rules (``include``/``exclude``: ``"all-linear"``, globs,
``re:`` regexes; ``target_modules``, Hugging Face's word, is accepted for ``include``); embeddings,
the output head, norms and biases stay on plain AdamW by default.

Gradient accumulation, clipping (Lightning clips the full gradient before the optimizer step,
hence before projection), bf16 mixed precision and DDP (gradients are averaged before the step,
so every rank computes the same basis) need nothing special. Under FSDP2 (``ModelParallelStrategy``
with ``tensor_parallel_size=1``, ``fully_shard`` in ``configure_model``) the targets are found again
by name when ``configure_optimizers`` runs, after ``fully_shard`` replaced the parameters, and the
optimizer steps each matrix from this rank's rows (see :class:`GaLoreAdamW` for what each side
communicates and holds). The per-layer mode
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

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.checks import check_bool, check_int
from lit_efficient.core.distributed import refuse_sharded_strategies
from lit_efficient.core.figures import bars, epoch_figure_due, figure_writer, line_chart, log_figure, width_for
from lit_efficient.core.lightning_internals import inner_schedulers, mark_step_tracked, replace_method, restore_method
from lit_efficient.core.logs import step_logs_due
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.shards import local
from lit_efficient.core.targets import ALL_LINEAR, rebind_targets, select_targets, validate_patterns
from lit_efficient.core.time import step_interval
from lit_efficient.lowrank.optim import GaLoreAdamW, MomentsOnRefresh, check_galore_group, state_bytes
from lit_efficient.lowrank.projector import PROJ_TYPES, PROJECTIONS, Projection, ProjType

_CONVERTIBLE = (torch.optim.AdamW, torch.optim.Adam)
_HISTORY = 2000  # samples of the optimizer state kept for its figure


class GaLore(EfficientCallback):
    r"""Train the module's targeted weight matrices with GaLore-projected AdamW moments.

    Args:
        rank: rank r of the projection (> 0, at most the smaller dimension of every target;
            the paper uses d_model/4 to d_model/2 for pre-training, 4–8 for fine-tuning).
        update_proj_gap: optimizer steps between basis refreshes (default 200): an int or a time
            spec in steps (``"200st"``, ``"200ba"``); fractions of the run and epochs are refused.
        scale: α, the update scale (default 0.25 for pre-training; 2–4 for fine-tuning).
        proj_type: ``"std"`` (default), ``"reverse_std"``, ``"left"``, ``"right"`` or ``"full"``.
        projection: ``"svd"`` (default), ``"randomized_svd"`` or ``"random"`` (APOLLO-style).
        include: module patterns to project (default None: ``"all-linear"``, every Linear but the
            head and embedding-tied layers); a list of globs, names or ``re:`` regexes.
        exclude: module patterns never to project.
        fira: add back the out-of-subspace gradient, scaled, with Fira's norm-growth limiter.
        eight_bit: keep the moments blockwise-quantized to 8 bits (bitsandbytes).
        layerwise: step each matrix inside backward and free its gradient (per-layer mode);
            refused with gradient accumulation, gradient clipping, multi-process training and a
            GradScaler (16-mixed: its overflow steps could not be skipped).
        seed: seed of the random projections and randomized-SVD sketches (identical on every rank).
        moments_on_refresh: what a basis refresh does to the Adam moments: ``"rotate"`` (default)
            aligns signs, then maps the moments into the new basis (the first moment by the change
            of basis, the second by its squares; best validation loss and closest to one process
            under DDP in ``docs/methods/galore.md``); ``"align"`` flips each new basis vector to its
            predecessor's sign and keeps the moments; ``"keep"`` leaves them in the old
            coordinates, as the reference implementation (galore-torch) does. Only ``"keep"`` lets
            the arbitrary signs of a decomposition change the update (e.g. between one process and
            DDP).
        shard_basis: under FSDP2, keep only this rank's rows of each right-side basis Q (r×n) and
            all-gather it at every step (default False: Q is whole on every rank and the right side
            sends nothing per step). Per-rank optimizer state becomes one process's divided by the
            number of ranks, for r×n more sent per matrix and step (see the method card's FSDP2
            section). No effect without FSDP2.
        target_modules: alias of ``include`` (Hugging Face PEFT's and ``galore-torch``'s name);
            giving both with different selections is a ValueError. After construction both
            attributes hold the resolved selection, so the callback rebuilds from its attributes.
        progress_bar: show ``state/AdamW``, the optimizer state as a fraction of AdamW's for the same
            parameters, in the progress bar (default True; updated on logging steps).

    Every argument reads back as the attribute of the same name (``update_proj_gap`` as the int it
    resolved to).

    Logged under ``efficient/galore/``: ``optimizer_state_bytes`` and ``adamw_state_bytes`` (what
    AdamW would hold for the same parameters) and their ``state_ratio``, ``refresh_seconds``
    (cumulative basis computation time), ``subspace_overlap`` (mean squared cosine of the principal
    angles between consecutive bases, 1 = unchanged) at refreshes, and ``rank``. The savings table
    has the optimizer state's peak and mean over the run (sampled on logging steps and at the end)
    against AdamW's for the same parameters, and the state at the end, which says so when freezing
    had emptied the optimizer.

    Figures (TensorBoard, rank 0, with matplotlib): ``subspace_overlap`` at each refresh after the
    first — the overlap of every projected matrix, named, above the mean (and range over matrices)
    at every refresh so far — and ``optimizer_state`` at the end of each training epoch (of about 16
    in a longer run): this rank's state in MiB over the run beside AdamW's for the same parameters.
    APOLLO's random projections (``projection="random"``) are redrawn, not refreshed from
    gradients, and have no overlap figure.
    """

    technique = "galore"

    def __init__(
        self,
        rank: int = 128,
        update_proj_gap: Union[int, str] = 200,
        scale: float = 0.25,
        proj_type: ProjType = "std",
        projection: Projection = "svd",
        include: Union[str, list[str], None] = None,
        exclude: Optional[list[str]] = None,
        fira: bool = False,
        eight_bit: bool = False,
        layerwise: bool = False,
        seed: int = 0,
        moments_on_refresh: MomentsOnRefresh = "rotate",
        shard_basis: bool = False,
        target_modules: Union[str, list[str], None] = None,
        progress_bar: bool = True,
    ) -> None:
        self.rank = rank
        self.update_proj_gap = step_interval(update_proj_gap, "update_proj_gap")
        self.scale = scale
        self.proj_type = proj_type
        self.projection = projection
        self.fira = check_bool(fira, "fira")
        self.eight_bit = check_bool(eight_bit, "eight_bit")
        self.seed = check_int(seed, "seed")
        self.moments_on_refresh = moments_on_refresh
        self.shard_basis = check_bool(shard_basis, "shard_basis")
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        check_galore_group({**self.group_options, "params": []})  # ValueErrors naming the argument
        if eight_bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as err:
                raise ValueError("`eight_bit=True` needs bitsandbytes (`pip install bitsandbytes`)") from err
        includes = validate_patterns(include, "include")
        aliased = validate_patterns(target_modules, "target_modules")
        if include is not None and target_modules is not None and set(includes) != set(aliased):
            raise ValueError(f"`include`={includes} and `target_modules`={aliased} select different modules; "
                             "`target_modules` is an alias of `include`: give one of them")
        # errors at setup name the argument the user wrote
        self._include_argument = "target_modules" if include is None and target_modules is not None else "include"
        self.include = includes or aliased or [ALL_LINEAR]
        self.target_modules = self.include  # the alias reads back the same selection (no conflict on rebuild)
        self.exclude = validate_patterns(exclude, "exclude") or None
        self.layerwise = check_bool(layerwise, "layerwise")
        self.targets: list = []
        self.optimizers: list[GaLoreAdamW] = []
        self._hooks: list = []
        self._original_configure = None
        self._seen_refreshes = 0
        # optimizer state over the run, sampled on logging steps and at the end: (ours, AdamW's) peak and sum
        self.state_peak, self.state_sum, self.state_samples = [0, 0], [0.0, 0.0], 0
        # for the figures: (step, ours, AdamW's) at each sample, and (step, mean, min, max) overlap at each refresh
        self.state_history: list[tuple[int, int, int]] = []
        self.refresh_history: list[tuple[int, float, float, float]] = []

    @property
    def group_options(self) -> dict[str, Any]:
        """The GaLoreAdamW group keys this callback sets on every converted group."""
        return {"rank": self.rank, "update_proj_gap": self.update_proj_gap, "scale": self.scale,
                "proj_type": self.proj_type, "projection": self.projection, "fira": self.fira,
                "eight_bit": self.eight_bit, "seed": self.seed, "moments_on_refresh": self.moments_on_refresh,
                "shard_basis": self.shard_basis}

    # -- converting the module's optimizer --------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, "GaLore", "the projection needs each gradient matrix whole or split by rows",
                                  fsdp2=True)
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
                                 f"overflow: it cannot run with {', '.join(problems)}. "
                                 "Use layerwise=False (or bf16-mixed).")
            if not pl_module.automatic_optimization:
                raise ValueError("GaLore(layerwise=True) needs automatic optimization")
        self.targets = select_targets(pl_module, self.include, self.exclude, kinds=("linear",),
                                      include_argument=self._include_argument)
        rank = self.rank
        small = [f"{t.name} {tuple(t.param.shape)}" for t in self.targets if rank > min(t.param.shape)]
        if small:
            raise ValueError(f"`rank`={rank} is larger than these targeted matrices allow: {', '.join(small)}; "
                             "lower `rank` or leave them out with `exclude`")
        original = pl_module.configure_optimizers

        def configure() -> Any:
            # called after configure_model: under FSDP2, fully_shard has replaced every parameter since setup
            self.targets = rebind_targets(self.targets, pl_module)
            return self.convert(original())

        self._original_configure = replace_method(pl_module, "configure_optimizers", configure)
        super().setup(trainer, pl_module, stage)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            restore_method(pl_module, "configure_optimizers", self._original_configure)
            self._original_configure = None
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
                    mark_step_tracked(new)
                for inner in inner_schedulers(obj):  # SequentialLR, ChainedScheduler
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
        l2_decay = any(g.get("weight_decay", 0) and not g.get("decoupled_weight_decay", False)
                       for g in optimizer.param_groups)
        if isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW) and l2_decay:
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
        """What torch AdamW would hold for the same parameters on this rank: two fp32 moments each."""
        return sum(2 * 4 * local(p).numel() for opt in self.optimizers for g in opt.param_groups for p in g["params"])

    def projected_state(self) -> tuple[int, int]:
        """(GaLore state bytes, AdamW state bytes) of the projected matrices alone."""
        galore = adamw = 0
        for opt in self.optimizers:
            params = [p for p, _ in opt.projected_params()]
            galore += state_bytes(opt, params)
            adamw += sum(2 * 4 * local(p).numel() for p in params)  # this rank's part
        return galore, adamw

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.layerwise:  # the per-layer mode steps matrices one by one, inside backward
            for optimizer in self.optimizers:
                optimizer.start_step()

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.optimizers:
            return
        refreshes = sum(o.refreshes for o in self.optimizers)
        if refreshes != self._seen_refreshes:
            overlaps = self.overlaps()
            if overlaps:
                values = list(overlaps.values())
                mean = sum(values) / len(values)
                self.log_metrics(pl_module, {"subspace_overlap": mean}, event=True)
                self.refresh_history.append((trainer.global_step, mean, min(values), max(values)))
                if figure_writer(trainer) is not None:
                    self.draw_overlaps(trainer, overlaps)
        self._seen_refreshes = refreshes
        if step_logs_due(trainer):
            ours, adamw = self.sample_state()
            self.log_metrics(pl_module, {
                "optimizer_state_bytes": float(ours), "adamw_state_bytes": float(adamw),
                "state_ratio": ours / max(1, adamw), "rank": float(self.rank),
                "refresh_seconds": sum(o.refresh_seconds for o in self.optimizers),
            })
            if adamw:
                self.show_progress(pl_module, "state/AdamW", round(ours / adamw, 3))

    def overlaps(self) -> dict[str, float]:
        """The subspace overlap of each matrix refreshed in the latest step, by target name, in the
        model's order (the per-layer mode refreshes them in backward's order)."""
        latest = {key: value for o in self.optimizers for key, value in o.last_overlaps.items()}
        return {t.name: latest[id(t.param)] for t in self.targets if id(t.param) in latest}

    def sample_state(self) -> tuple[int, int]:
        """This rank's optimizer-state bytes and AdamW's for the same parameters now, kept for the
        run's peak and mean (and the ``optimizer_state`` figure)."""
        ours, adamw = sum(state_bytes(o) for o in self.optimizers), self.adamw_state_bytes()
        self.state_peak = [max(self.state_peak[0], ours), max(self.state_peak[1], adamw)]
        self.state_sum = [self.state_sum[0] + ours, self.state_sum[1] + adamw]
        self.state_samples += 1
        step = self._trainer.global_step if self._trainer is not None else self.state_samples
        if not self.state_history or self.state_history[-1][0] != step:
            self.state_history.append((step, ours, adamw))
            if len(self.state_history) > _HISTORY:  # a long run keeps every other sample (and the latest)
                self.state_history = self.state_history[:-1:2] + self.state_history[-1:]
        return ours, adamw

    def draw_overlaps(self, trainer: "pl.Trainer", overlaps: dict[str, float]) -> None:
        step, (steps, means, lows, highs) = trainer.global_step, zip(*self.refresh_history)
        mean = means[-1]

        def draw(figure: Any) -> None:
            top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [3, 2]})
            bars(top, list(overlaps), {"this refresh": list(overlaps.values())},
                 f"galore: subspace kept per matrix at the refresh of step {step} (rank {self.rank}, mean {mean:.2f})",
                 "overlap (1 = same subspace)", ylim=(0.0, 1.05))
            bottom.fill_between(steps, lows, highs, alpha=0.25, label="range over matrices")
            line_chart(bottom, {"mean over matrices": (steps, means)}, "overlap at each refresh", "optimizer step",
                       "overlap")
            bottom.set_ylim(0.0, 1.05)

        log_figure(trainer, self.technique, "subspace_overlap", draw, width=width_for(len(overlaps)), height=7.0)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.state_history and figure_writer(trainer) is not None and epoch_figure_due(trainer):
            self.draw_state(trainer)

    def draw_state(self, trainer: "pl.Trainer") -> None:
        steps, ours, adamw = zip(*self.state_history)
        peak, peak_adamw = max(ours), max(adamw)
        ratio = f", {peak / peak_adamw:.2f}x AdamW's" if peak_adamw else ""

        def draw(figure: Any) -> None:
            line_chart(figure.add_subplot(1, 1, 1),
                       {"GaLore": (steps, [v / 2**20 for v in ours]),
                        "AdamW, same parameters": (steps, [v / 2**20 for v in adamw])},
                       f"galore: optimizer state on rank 0 (peak {peak / 2**20:.2f} MiB{ratio})", "optimizer step",
                       "MiB")

        log_figure(trainer, self.technique, "optimizer_state", draw)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.optimizers:
            self.sample_state()  # the run's last state counts towards its peak and mean

    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if not self.optimizers:
            return []
        ours, adamw = sum(state_bytes(o) for o in self.optimizers), self.adamw_state_bytes()
        rows = []
        if self.state_samples:  # sampled on logging steps and at the end of training
            (peak, peak_adamw), (mean, mean_adamw) = self.state_peak, (t / self.state_samples for t in self.state_sum)
        else:  # asked before training ended
            peak, peak_adamw, mean, mean_adamw = ours, adamw, ours, adamw
        # another technique (freezing) may have emptied the optimizer by the end: the run's peak and mean say more
        for quantity, value, versus in (("optimizer state, peak over the run", peak, peak_adamw),
                                        ("optimizer state, mean over the run", mean, mean_adamw)):
            rows.append(SavingsRow(self.technique, quantity,
                                   f"{value / 2**20:.2f} MiB vs {versus / 2**20:.2f} MiB AdamW",
                                   value / versus if versus else None, "AdamW"))
        if adamw:
            projected, projected_adamw = self.projected_state()
            rows.append(SavingsRow(self.technique, "optimizer state",  # at the end
                                   f"{ours / 2**20:.2f} MiB vs {adamw / 2**20:.2f} MiB AdamW", ours / adamw, "AdamW"))
            value = (f"{projected / 2**20:.2f} MiB, rank {self.rank}" if projected_adamw else
                     "none at the end: every projected matrix had left the optimizer (frozen by another technique)")
            rows.append(SavingsRow(self.technique, "state of projected matrices", value,
                                   projected / projected_adamw if projected_adamw else None, "AdamW"))
        else:
            rows.append(SavingsRow(self.technique, "optimizer state",
                                   "none at the end: every parameter had left the optimizer (frozen by another "
                                   "technique); see the peak and mean"))
        return rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"state_peak": list(self.state_peak), "state_sum": list(self.state_sum),
                "state_samples": self.state_samples, "state_history": [list(s) for s in self.state_history],
                "refresh_history": [list(r) for r in self.refresh_history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state_peak = [int(v) for v in state_dict["state_peak"]]
        self.state_sum = [float(v) for v in state_dict["state_sum"]]
        self.state_samples = int(state_dict["state_samples"])
        # checkpoints written before the figures have no histories: those figures start afresh
        self.state_history = [(int(s), int(o), int(a)) for s, o, a in state_dict.get("state_history", [])]
        self.refresh_history = [(int(s), float(m), float(lo), float(hi))
                                for s, m, lo, hi in state_dict.get("refresh_history", [])]


__all__ = ["GaLore", "PROJECTIONS", "PROJ_TYPES"]
