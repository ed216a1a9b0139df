"""Instance-level loss-based reweighting: weight each sample of the batch by its loss.

Paper: Sow et al., "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model
Pretraining", ICLR 2025, https://arxiv.org/abs/2502.06733.

Every micro-batch, the per-sample losses of the *global* micro-batch (all-gathered across DDP
ranks) are min-max normalised to ``h ∈ [−1, 1]``, shaped by a strategy ``f(h)`` and turned into
weights ``w = softmax(f / r)`` that sum to 1. Each rank's loss is ``world_size · Σ_local w_i ℓ_i``,
so after DDP's gradient averaging the loss scale is that of a plain mean. Weights carry no gradient.

Strategies: ``"linupper"`` ``f = min(h + 1, 1)`` (the paper's recommendation: down-weights the
easiest samples, treats all the rest alike, so noisy outliers are not amplified), ``"quadratic"``
``f = 1 − h²`` (favours medium losses), ``"extremes"`` ``f = |h|`` (both ends), ``"uniform"``
``f = 0`` (the plain mean). The temperature ``r`` bounds the largest/smallest weight ratio by
``e^{1/r}``; ``r → ∞`` is the plain mean.

It saves no FLOPs: it spends the same compute on more useful samples (faster convergence, better
final loss). For diffusion models the per-sample loss mostly reflects the sampled noise level;
``timestep_buckets`` normalises within buckets of timesteps so the weights compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lit_efficient.core.checks import check_bool, check_int
from lit_efficient.core.distributed import gather_samples
from lit_efficient.core.figures import epoch_figure_due, figure_writer, histogram, log_figure, scatter_chart
from lit_efficient.core.logs import log_histogram, step_logs_due, tensorboard_writer
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.time import Time, TimeSpec, TrainingLength
from lit_efficient.data.sample_losses import NonfiniteCount, SampleLossCallback

Strategy = Literal["linupper", "quadratic", "extremes", "uniform"]
STRATEGIES: tuple[str, ...] = ("linupper", "quadratic", "extremes", "uniform")


def normalise_losses(losses: Tensor, groups: Optional[Tensor] = None, finite: Optional[Tensor] = None,
                     num_groups: Optional[int] = None) -> Tensor:
    """Min-max normalise ``losses`` to [−1, 1] (in float64): ``(2ℓ − (max + min)) / max(max − min, 1e-6)``.

    With ``groups`` (integer ids in ``[0, num_groups)``), each group is normalised by its own min and
    max; without ``num_groups`` it is read off ``groups`` (a device-to-host sync). Entries where
    ``finite`` is False take no part and come out as 0.
    """
    x = losses.detach().to(torch.float64)
    finite = torch.isfinite(x) if finite is None else finite
    if groups is None:
        groups, size = torch.zeros_like(x, dtype=torch.long), 1
    else:
        groups = groups.to(torch.long)
        size = num_groups if num_groups is not None else (int(groups.max()) + 1 if groups.numel() else 1)
    lo = torch.full((size,), math.inf, dtype=x.dtype, device=x.device)
    hi = torch.full((size,), -math.inf, dtype=x.dtype, device=x.device)
    lo = lo.scatter_reduce(0, groups, torch.where(finite, x, math.inf), "amin")
    hi = hi.scatter_reduce(0, groups, torch.where(finite, x, -math.inf), "amax")
    lo, hi = lo[groups], hi[groups]
    h = (2 * x - (hi + lo)) / torch.clamp(hi - lo, min=1e-6)
    return torch.where(finite, h.clamp(-1.0, 1.0), torch.zeros_like(h))


def strategy_scores(h: Tensor, strategy: Strategy) -> Tensor:
    """The strategy's shape ``f(h)`` of normalised losses ``h`` (all in [0, 1])."""
    if strategy == "linupper":
        return torch.clamp(h + 1.0, max=1.0)
    if strategy == "quadratic":
        return 1.0 - h * h
    if strategy == "extremes":
        return h.abs()
    if strategy == "uniform":
        return torch.zeros_like(h)
    raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}; got {strategy!r}")


def reweight(losses: Tensor, strategy: Strategy = "linupper", temperature: float = 1.0,
             groups: Optional[Tensor] = None, num_groups: Optional[int] = None) -> Tensor:
    """Weights (summing to 1, float32) of the samples with per-sample ``losses``.

    Non-finite losses get weight 0 and the rest are weighted among themselves (all 0 if none is
    finite); ``uniform`` or an infinite ``temperature`` give exactly ``1/N`` each. Computed on the
    losses' device without a host sync (give ``num_groups`` with ``groups``). Usable without Lightning::

        loss = (reweight(losses.detach()) * losses).sum()
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}; got {strategy!r}")
    check_temperature(temperature)
    finite = torch.isfinite(losses.detach())
    if strategy == "uniform" or math.isinf(temperature):
        return finite.to(torch.float32) / finite.sum().clamp(min=1)
    logits = strategy_scores(normalise_losses(losses, groups, finite, num_groups), strategy) / temperature
    logits = torch.where(finite, logits, torch.full_like(logits, -math.inf))
    weights = torch.softmax(logits, dim=0)  # softmax subtracts the max: no overflow (NaN if nothing is finite)
    return torch.where(finite, weights, torch.zeros_like(weights)).to(torch.float32)


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number (float('inf') for the plain mean); "
                         f"got {temperature!r}")
    return float(temperature)


class LossReweighting(SampleLossCallback):
    r"""Weight every sample of the batch by its loss (Sow et al., ICLR 2025).

    The module must follow the per-sample loss contract:
    ``return {"loss": losses.mean(), "sample_losses": losses}``.

    Args:
        strategy: ``"linupper"`` (default), ``"quadratic"``, ``"extremes"`` or ``"uniform"``.
        temperature: softmax temperature ``r`` > 0 (default 1.0, the paper's choice for small
            models; 0.4 for deeper ones). The largest/smallest weight ratio is at most ``e^{1/r}``.
        warmup: time spec of plain-mean training first (default ``0.05``: 5% of the run; the
            paper uses 1000 steps of its GPT-2 runs).
        timestep_buckets: 0 (default) normalises over the whole batch; ``k > 0`` normalises within
            ``k`` equal buckets of diffusion timesteps, read from ``training_step``'s output key
            ``timestep_key`` (values in ``[0, num_timesteps)``).
        timestep_key: output key holding each sample's timestep (default ``"timesteps"``).
        num_timesteps: number of diffusion timesteps (default 1000).
        progress_bar: show ``ess%=<effective sample size, percent of the batch>`` in the progress
            bar, updated on logging steps (default True).

    Logged under ``efficient/loss_reweighting/``: ``effective_sample_size`` ((1/Σw²)/N, 1 for
    the plain mean), ``max_min_weight_ratio``, ``loss_unweighted`` and ``loss_weighted``,
    ``nonfinite_samples``, and a histogram ``weights`` of ``N·w`` in TensorBoard, on the steps Lightning
    writes logs (every ``log_every_n_steps``); a warning counts the non-finite sample losses left out.
    The figure ``weights`` (each sample's ``N·w`` against its loss, and their histogram) is drawn on the
    first logging step of each epoch (of about 16 spread over a longer run).
    """

    technique = "loss_reweighting"

    def __init__(
        self,
        strategy: Strategy = "linupper",
        temperature: float = 1.0,
        warmup: TimeSpec = 0.05,
        timestep_buckets: int = 0,
        timestep_key: str = "timesteps",
        num_timesteps: int = 1000,
        progress_bar: bool = True,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}; got {strategy!r}")
        self.strategy = strategy
        self.temperature = check_temperature(temperature)
        self.warmup = Time.parse(warmup, "warmup")
        check_int(timestep_buckets, "timestep_buckets", 0)
        check_int(num_timesteps, "num_timesteps", 1)
        if not isinstance(timestep_key, str) or not timestep_key:
            raise ValueError(f"`timestep_key` must be a non-empty key of training_step's output; got {timestep_key!r}")
        if timestep_buckets > num_timesteps:
            raise ValueError(f"`timestep_buckets` ({timestep_buckets}) must not exceed "
                             f"`num_timesteps` ({num_timesteps})")
        self.timestep_buckets, self.timestep_key, self.num_timesteps = timestep_buckets, timestep_key, num_timesteps
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        self.warmup_steps = 0
        self._last_weights: Optional[Tensor] = None
        self._last_losses: Optional[Tensor] = None  # the global micro-batch's losses the weights came from
        self._drawn_epoch = -1  # the epoch whose weights figure is drawn
        self._batch: Optional[tuple[Tensor, Tensor, Tensor, Optional[Tensor]]] = None
        self._nonfinite = NonfiniteCount("LossReweighting")
        self.weighted_steps = 0

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.warmup_steps = TrainingLength.from_trainer(trainer).steps(self.warmup, "warmup")

    def active(self, step: int) -> bool:
        return step >= self.warmup_steps and self.strategy != "uniform" and not math.isinf(self.temperature)

    @override
    def sample_multipliers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", losses: Tensor,
                           finite: Tensor, output: Mapping[str, Any]) -> Optional[Tensor]:
        if not self.active(self.position(trainer.global_step)):
            return None
        groups = None
        if self.timestep_buckets:
            if self.timestep_key not in output:
                raise ValueError(f"LossReweighting(timestep_buckets={self.timestep_buckets}) reads each sample's "
                                 f"timestep from training_step's output key `timestep_key`={self.timestep_key!r}; "
                                 f"the output has keys {sorted(output)}")
            t = torch.as_tensor(output[self.timestep_key], device=losses.device).detach().reshape(-1).to(torch.long)
            groups = (t.clamp(0, self.num_timesteps - 1) * self.timestep_buckets) // self.num_timesteps
            groups, _ = gather_samples(trainer, groups)
        all_losses, offset = gather_samples(trainer, torch.where(finite, losses, torch.full_like(losses, math.nan)))
        weights = reweight(all_losses, self.strategy, self.temperature, groups,
                           self.timestep_buckets if self.timestep_buckets else None)
        self._last_weights, self._last_losses = weights, all_losses
        # world · N_local · w_i: the local mean of m·ℓ is world · Σ_local w·ℓ, a plain mean's scale after DDP
        return weights[offset : offset + losses.numel()] * (trainer.world_size * losses.numel())

    @override
    def reduced(self, trainer: "pl.Trainer", losses: Tensor, finite: Tensor, multipliers: Tensor) -> None:
        self._nonfinite.add(finite)  # read when logging: no host sync per step
        self._batch = (losses, finite, multipliers, self._last_weights)

    def statistics(self) -> dict[str, Tensor]:
        """The logged statistics of the last micro-batch."""
        assert self._batch is not None
        losses, finite, multipliers, weights = self._batch
        stats = {
            "loss_unweighted": losses.sum() / finite.sum().clamp(min=1),
            "loss_weighted": (multipliers * losses).sum() / losses.numel(),
            "nonfinite_samples": (~finite).sum(),
            "effective_sample_size": torch.tensor(1.0),
            "max_min_weight_ratio": torch.tensor(1.0),
        }
        if weights is not None:
            kept = weights[weights > 0]
            stats["effective_sample_size"] = 1.0 / (weights.double() ** 2).sum() / max(1, kept.numel())
            stats["max_min_weight_ratio"] = kept.max() / kept.min()
        return stats

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batch is None:
            return
        weights = self._last_weights
        if weights is not None:
            self.weighted_steps += 1
        # statistics only on the steps Lightning writes: logging every step costs more than the weighting
        if step_logs_due(trainer):
            self._nonfinite.flush()
            stats = self.statistics()
            self.log_metrics(pl_module, stats)
            if weights is not None:
                self.show_weights(trainer, pl_module, weights, stats)
        self._batch, self._last_weights, self._last_losses = None, None, None

    def show_weights(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", weights: Tensor,
                     stats: Mapping[str, Tensor]) -> None:
        """On a logging step: the progress entry, the histogram and (once an epoch) the figure of the weights."""
        draw = (trainer.current_epoch != self._drawn_epoch and figure_writer(trainer) is not None
                and epoch_figure_due(trainer))
        # a logging step reads its scalars anyway: reading one more costs no extra wait
        ess = float(stats["effective_sample_size"]) if self.progress_bar or draw else 1.0
        self.show_progress(pl_module, "ess%", round(100 * ess, 1))
        if tensorboard_writer(trainer) is not None:  # rank 0: the others skip the masking too
            log_histogram(trainer, self.technique, "weights", weights[weights > 0] * (weights > 0).sum())
        if draw:
            self._drawn_epoch = trainer.current_epoch
            self.draw_weights(trainer, weights, self._last_losses, ess)

    def draw_weights(self, trainer: "pl.Trainer", weights: Tensor, losses: Tensor, ess: float) -> None:
        """Each sample's ``N·w`` against its loss, and their histogram, of the global micro-batch."""
        kept = weights > 0
        scaled = (weights[kept] * kept.sum()).float().cpu()
        losses = losses[kept].float().cpu()
        bucketed = f", {self.timestep_buckets} timestep buckets" if self.timestep_buckets else ""
        name = f"{self.strategy}, r={self.temperature:g}{bucketed}"

        def draw(figure) -> None:
            scatter_chart(figure.add_subplot(1, 2, 1), losses, scaled,
                          f"Weight against loss, step {trainer.global_step} ({name})", "per-sample loss",
                          "N·w (1 = plain mean)", line=("plain mean", 1.0))
            histogram(figure.add_subplot(1, 2, 2), scaled,
                      f"Weights of {scaled.numel()} samples (effective sample size {ess:.0%})", "N·w",
                      bins=30, threshold=("plain mean", 1.0))

        log_figure(trainer, self.technique, "weights", draw, width=13.0, height=5.0)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._nonfinite.flush()

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        return [SavingsRow(self.technique, "compute", f"none saved; {self.strategy} weights on "
                           f"{self.weighted_steps} micro-batches (aims at faster convergence)", None)]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"weighted_steps": self.weighted_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.weighted_steps = int(state_dict.get("weighted_steps", 0))


__all__ = ["STRATEGIES", "LossReweighting", "normalise_losses", "reweight", "strategy_scores"]
