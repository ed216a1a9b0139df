"""DDP that all-reduces only what each technique's coming step reads — exactly, not approximately.

Between basis refreshes GaLore reads only the projection of a matrix's gradient (``R = Pᵀ G Qᵀ``);
between the steps that regrow by gradient, sparse training (GraNet, RigL, SET, SparCL) keeps only the
gradient's entries at the mask's active positions. Both parts are linear in the gradient and the
same on every rank, so all-reducing each rank's part gives exactly the part of the averaged
gradient (:mod:`lit_efficient.core.gradient_travel`). Unlike torch's PowerSGD hook this is not an
approximation and needs no error feedback; it saves only where a technique discards.

Before each backward the strategy asks every callback and optimizer that implements
:class:`lit_efficient.core.protocols.ReadsPartOfGradients` what its step reads. Its DDP
communication hook then packs each bucket's gradients — the parts, and every other gradient whole —
into one flat tensor, all-reduces it (averaged, as DDP), and writes each gradient back: a projection
as ``P R Q``, kept entries with zeros elsewhere. Steps that read a gradient whole (a GaLore refresh,
growth by gradient or momentum, an AutoFreeze check) send it whole. Without any such technique the
hook is DDP's own all-reduce.

What other readers of ``.grad`` see: after the all-reduce a GaLore target's gradient is its
projection onto the current subspace, and a sparse target's gradient is zero at inactive entries.
Gradient clipping by norm (``gradient_clip_val``) therefore takes the norm over the projections and
kept entries — the gradient the techniques' updates use — and gradient-norm logging reports the
same. AdamW's update of a sparse layer's active entries and GaLore's update are unchanged (up to
float rounding: ``Pᵀ(P R) = R``).

Paper context: GaLore (Zhao et al., ICML 2024, https://arxiv.org/abs/2403.03507) notes the projected
gradient as the only quantity the optimizer needs; PowerSGD (Vogels et al., NeurIPS 2019,
https://arxiv.org/abs/1905.13727) is the approximate low-rank all-reduce torch ships.
"""

from collections import defaultdict
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.checks import check_bool
from lit_efficient.core.gradient_travel import Part, merge_parts
from lit_efficient.core.protocols import ReadsPartOfGradients
from lit_efficient.core.savings import SavingsRow

MIB = 2**20
UNCLAIMED = "other"  # gradients no technique reads part of: they travel whole, as under DDP


class GradientTraffic:
    """The plan of the coming step (parameter id → technique, part) and the bytes each rank handed
    to the all-reduce: per technique, sent and what plain DDP would have sent."""

    def __init__(self) -> None:
        self.plan: dict[int, tuple[str, Part]] = {}
        self.group: Optional[dist.ProcessGroup] = None
        self.step_sent: dict[str, int] = defaultdict(int)  # since the last optimizer step
        self.step_whole: dict[str, int] = defaultdict(int)
        self.total_sent: dict[str, int] = defaultdict(int)
        self.total_whole: dict[str, int] = defaultdict(int)
        self.steps = 0
        self.last_sent: dict[str, int] = {}  # the latest optimizer step's counts
        self.last_whole: dict[str, int] = {}

    def close_step(self) -> tuple[dict[str, int], dict[str, int]]:
        """Move this step's counts into the totals; return them (sent, whole) per technique."""
        sent, whole = dict(self.step_sent), dict(self.step_whole)
        self.last_sent, self.last_whole = sent, whole
        for technique, value in sent.items():
            self.total_sent[technique] += value
        for technique, value in whole.items():
            self.total_whole[technique] += value
        self.step_sent.clear()
        self.step_whole.clear()
        self.steps += 1
        return sent, whole

    def state_dict(self) -> dict[str, Any]:
        return {"total_sent": dict(self.total_sent), "total_whole": dict(self.total_whole), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_sent = defaultdict(int, {k: int(v) for k, v in state["total_sent"].items()})
        self.total_whole = defaultdict(int, {k: int(v) for k, v in state["total_whole"].items()})
        self.steps = int(state["steps"])


def _bucket_views(bucket: dist.GradBucket) -> list[Tensor]:
    """Each parameter's gradient as a view of the bucket's flat buffer (DDP lays them end to end)."""
    buffer, params = bucket.buffer(), bucket.parameters()
    sizes = [p.numel() for p in params]
    if sum(sizes) != buffer.numel():
        raise RuntimeError(f"a DDP bucket of {buffer.numel()} elements holds parameters of {sum(sizes)}: "
                           "its layout is not the one this hook reads")
    return [flat.view(p.shape) for flat, p in zip(buffer.split(sizes), params)]


# torch checks the hook's annotations at registration: they are objects here, not strings
def exact_compression_hook(traffic: GradientTraffic, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce (average) each gradient's part named in ``traffic.plan``
    and every other gradient whole, in one collective per bucket; write the results back. A bucket
    without parts is reduced as DDP reduces it, bit for bit."""
    group = traffic.group if traffic.group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    grads = _bucket_views(bucket)
    chosen = [traffic.plan.get(id(p), (UNCLAIMED, None)) for p in bucket.parameters()]
    size = buffer.element_size()
    for grad, (technique, part) in zip(grads, chosen):
        traffic.step_whole[technique] += grad.numel() * size
        traffic.step_sent[technique] += (grad.numel() if part is None else part.numel(grad.shape)) * size
    if all(part is None for _, part in chosen):  # DDP's own reduction as its reducer does it (× 1/world, then sum)
        buffer.mul_(1.0 / world)
        return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    pieces = [grad.reshape(-1) if part is None else part.pack(grad) for grad, (_, part) in zip(grads, chosen)]
    flat = torch.cat(pieces).mul_(1.0 / world)
    lengths = [piece.numel() for piece in pieces]

    def write_back(future: torch.futures.Future) -> Tensor:
        reduced = future.value()[0]
        for grad, (_, part), values in zip(grads, chosen, reduced.split(lengths)):
            if part is None:
                grad.copy_(values.view(grad.shape))
            else:
                part.unpack(values, grad)
        return buffer

    return dist.all_reduce(flat, group=group, async_op=True).get_future().then(write_back)


class TrafficReport(EfficientCallback):
    """Logs the bytes each optimizer step all-reduced (per rank, the collective's input), per
    technique and against plain DDP, and adds them to the savings table. Added by the strategy."""

    technique = "exact_ddp"

    def __init__(self, traffic: GradientTraffic, progress_bar: bool = True) -> None:
        self.traffic = traffic
        self.progress_bar = check_bool(progress_bar, "progress_bar")

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        # the step's all-reduces are done (its backward is over): closed before any callback's
        # on_train_batch_end could checkpoint the totals
        sent, whole = self.traffic.close_step()
        if not whole:
            return
        metrics = {"sent_mib": sum(sent.values()) / MIB, "sent_ratio": sum(sent.values()) / sum(whole.values())}
        metrics.update({f"sent_ratio/{t}": sent[t] / whole[t] for t in whole if whole[t]})
        self.log_metrics(pl_module, metrics)
        self.show_progress(pl_module, "sent%", round(100 * metrics["sent_ratio"], 1))

    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        traffic = self.traffic
        total_whole = sum(traffic.total_whole.values())
        if not traffic.steps or not total_whole:
            return []
        total_sent = sum(traffic.total_sent.values())
        per_step = traffic.steps * MIB
        rows = [SavingsRow(self.technique, "gradient bytes all-reduced per step (per rank)",
                           f"{total_sent / per_step:.3f} MiB vs {total_whole / per_step:.3f} MiB",
                           total_sent / total_whole, "plain DDP")]
        for technique in sorted(traffic.total_whole):
            whole = traffic.total_whole[technique]
            if whole and technique != UNCLAIMED:
                sent = traffic.total_sent[technique]
                rows.append(SavingsRow(self.technique, f"gradients of {technique}'s targets",
                                       f"{sent / per_step:.3f} MiB vs {whole / per_step:.3f} MiB", sent / whole,
                                       "plain DDP"))
        return rows

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"traffic": self.traffic.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.traffic.load_state_dict(state_dict["traffic"])


class ExactCompressionDDPStrategy(DDPStrategy):
    """DDP whose gradient all-reduce sends only what the techniques' coming step reads (see the module
    docstring): GaLore's projected gradients between refreshes, sparse layers' active entries
    between gradient-growth steps, everything else whole. Results equal plain DDP's up to float
    rounding; without a technique that reads part of a gradient it is plain DDP.

    Select it with ``Trainer(strategy=ExactCompressionDDPStrategy())`` or by name,
    ``strategy="ddp_exact_compression"`` (also in a LightningCLI yaml). It takes every argument of
    :class:`~lightning.pytorch.strategies.DDPStrategy` (``find_unused_parameters``,
    ``bucket_cap_mb``, ``process_group_backend`` ...) except a communication hook of its own: it is one.

    Logs ``efficient/exact_ddp/sent_mib`` (bytes each rank all-reduced in the step),
    ``sent_ratio`` (against plain DDP) and ``sent_ratio/<technique>``, and adds the means to the
    savings table; the progress bar shows ``sent%`` (the step's bytes against plain DDP's, in
    percent), unless ``progress_bar=False`` (the one argument of its own, keyword only).
    """

    strategy_name = "ddp_exact_compression"

    def __init__(self, *args: Any, progress_bar: bool = True, **kwargs: Any) -> None:
        for key in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period"):
            if kwargs.get(key) is not None:
                raise ValueError(f"`{key}`: ExactCompressionDDPStrategy is a communication hook itself and "
                                 "cannot take another; use DDPStrategy for a hook of your own")
        super().__init__(*args, **kwargs)
        self.traffic = GradientTraffic()
        self.report = TrafficReport(self.traffic, progress_bar)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and self.report not in trainer.callbacks:
            # before the callbacks' setup and the checkpoint's restore: its totals resume with the run
            trainer.callbacks.append(self.report)

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        self.traffic.group = self.model.process_group
        self.model.register_comm_hook(self.traffic, exact_compression_hook)  # Lightning's own: CUDA only

    @override
    def pre_backward(self, closure_loss: Tensor) -> None:
        super().pre_backward(closure_loss)
        trainer = self.lightning_module.trainer
        readers = [*trainer.callbacks, *trainer.optimizers]
        claims = [claim for reader in readers if isinstance(reader, ReadsPartOfGradients)
                  for claim in reader.gradient_parts(trainer)]
        self.traffic.plan = merge_parts(claims)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(cls.strategy_name, cls,
                                   description="DDP that all-reduces only the gradient parts techniques read (exact)")


def register(registry: Any = StrategyRegistry) -> None:
    """Make ``strategy="ddp_exact_compression"`` known to Lightning (once; on importing lit_efficient)."""
    if ExactCompressionDDPStrategy.strategy_name not in registry:
        ExactCompressionDDPStrategy.register_strategies(registry)


register()

__all__ = ["ExactCompressionDDPStrategy", "GradientTraffic", "TrafficReport", "exact_compression_hook"]
