"""N:M structured sparsity trained with SR-STE.

Paper: Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch",
ICLR 2021, https://arxiv.org/abs/2102.04010 (reference code: github.com/aojunzz/NM-sparsity).

Every forward uses ``W ⊙ M(W)``, where ``M`` keeps the ``n`` largest-magnitude weights of each
group of ``m`` consecutive weights along the reduction dimension (input features; input channels
for convolutions) and is recomputed from the current dense weights every time. The backward is
straight-through to the dense weights, and the sparse-refined term ``decay·(1 − M)⊙W`` is added
to their gradient once per optimizer step, in ``on_before_optimizer_step``, where Lightning has
unscaled AMP gradients and DDP has averaged them. The mask is a function of the weights, so there
is no mask state to save: a checkpoint of the dense weights resumes exactly, and every DDP rank
computes the same mask. Under FSDP2 (rows sharded) the forward sees the gathered weight and each
rank's optimizer step its own rows, whose N:M groups are whole: nothing is communicated but the
flip rate. At the end of ``fit`` the mask is written into the weights, so the model
(and what it saves from then on) is N:M sparse; 2:4 Linear weights can then be converted to
PyTorch's semi-structured format for GPU inference speed-ups (``export``).
"""

from __future__ import annotations

from typing import Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.checks import check_bool, check_int
from lit_efficient.core.clock import StepWatch
from lit_efficient.core.composition import Claim, weight_claim
from lit_efficient.core.distributed import local_part, refuse_sharded_strategies
from lit_efficient.core.lightning_internals import swap_parameter
from lit_efficient.core.logs import log_histogram, step_logs_due, tensorboard_writer
from lit_efficient.core.savings import SavingsRow
from lit_efficient.core.targets import Target, select_targets, validate_patterns

NM_KINDS = ("linear", "conv")


def nm_mask(weight: Tensor, n: int, m: int, dim: int = 1) -> Tensor:
    """Boolean mask keeping the ``n`` largest |w| in every group of ``m`` consecutive entries along ``dim``."""
    if weight.shape[dim] % m:
        raise ValueError(f"dimension {dim} of size {weight.shape[dim]} is not divisible by m={m}")
    moved = weight.detach().abs().movedim(dim, -1)
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, dim)


def nm_group_dim(target: Target) -> int:
    """The dimension whose consecutive entries form the N:M groups: the input features/channels."""
    return target.reduction_dim


class NMSparsity(EfficientCallback):
    """SR-STE N:M structured sparsity (see the module docstring).

    Args:
        n: weights kept per group, 1 ≤ n ≤ m (default 2).
        m: group size along the reduction dimension (default 4; 2:4 is what GPUs accelerate).
        decay: the sparse-refined decay λ_w on pruned weights, ≥ 0 (default 2e-4, the paper's);
            0 gives the plain straight-through estimator.
        include: module-name patterns to sparsify (default: every Linear/Conv layer except the
            stem and the head; see :mod:`lit_efficient.core.targets`). Every targeted layer's
            reduction dimension must be divisible by ``m``.
        exclude: module-name patterns never to sparsify.
        export_semi_structured: at the end of ``fit``, convert 2:4 Linear weights to
            ``torch.sparse.SparseSemiStructuredTensor`` (CUDA sm80+, fp16/bf16 weights only;
            elsewhere a message says why nothing was converted). Default False. Lightning moves
            the model to the CPU before ``on_fit_end``, so after a GPU run call :meth:`export`
            on the model moved back to the GPU (unverified here: no GPU was lent to this project).
        progress_bar: show ``sparsity=<1 - n/m>`` in the progress bar (default True).

    On logging steps a TensorBoard histogram ``weight_magnitude`` shows the targeted dense weights'
    magnitudes: SR-STE's decay pulls the pruned ones apart from the kept ones.
    """

    technique = "nm"

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        decay: float = 2e-4,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        export_semi_structured: bool = False,
        progress_bar: bool = True,
    ) -> None:
        check_int(n, "n", 1)
        check_int(m, "m", 1)
        if n > m:
            raise ValueError(f"`n` must not exceed `m` (keep n of every m weights); got n={n}, m={m}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(f"`decay` must be a non-negative number; got {decay!r}")
        self.n, self.m, self.decay = n, m, float(decay)
        self.include = validate_patterns(include, "include") or None
        self.exclude = validate_patterns(exclude, "exclude") or None
        self.export_semi_structured = check_bool(export_semi_structured, "export_semi_structured")
        self.progress_bar = check_bool(progress_bar, "progress_bar")
        self.targets: list[Target] = []
        self._handles: list = []
        self._dense: dict[int, nn.Parameter] = {}  # target index -> its dense weight, during a forward
        self._last_masks: dict[int, Tensor] = {}  # target index -> mask of its latest training forward
        self._previous_masks: dict[int, Tensor] = {}  # masks at the previous optimizer step (flip rate)
        self._params: Optional[list[nn.Parameter]] = None  # the targets' parameters as the fit began
        self._steps = StepWatch()
        self._flips: Union[Tensor, float] = 0.0  # fraction of mask entries changed at the last step

    @property
    def flip_rate(self) -> float:
        """Fraction of mask entries that changed between the last two optimizer steps."""
        return float(self._flips)

    @property
    def density(self) -> float:
        return self.n / self.m

    # -- set-up -------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        refuse_sharded_strategies(trainer, "NMSparsity", "the N:M mask could not see whole weights", fsdp2=True)
        targets = select_targets(pl_module, self.include, self.exclude, kinds=NM_KINDS)
        tied = [t.name for t in targets if t.aliases]
        if tied:
            raise ValueError(
                f"`include` selects tied weights {tied}: the other user of each would stay dense. "
                "Exclude them (N:M sparsity is for the matrix multiplications of Linear/Conv layers)"
            )
        ragged = [f"{t.name} {tuple(t.param.shape)}" for t in targets if t.param.shape[nm_group_dim(t)] % self.m]
        if ragged:
            raise ValueError(
                f"N:M groups run along the input dimension, which must be divisible by `m`={self.m}; "
                f"not so for {ragged}. Leave these layers out with `exclude`"
            )
        self.targets = targets
        # before configure_model shards the module: FSDP2's own forward hooks then gather the weight
        # before ours (its pre-hook is prepended) and reshard it after ours
        self._attach()
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # FSDP2 splits dim 0: N:M groups must not cross a rank's rows (they run along dim 1 unless
        # the weight is stored transposed, as GPT-2's Conv1D)
        # FSDP2 may leave a gathered copy in a module's slot (a frozen block's weight after the backward
        # prefetched it): the sharded parameters are kept from here
        sharded = any(isinstance(t.param, DTensor) for t in self.targets)
        self._params = [t.param for t in self.targets] if sharded else None
        across = [t.name for t in self.targets
                  if isinstance(t.param, DTensor) and nm_group_dim(t) == 0 and t.param.shape[0] > 0]
        if across:
            raise ValueError(f"NMSparsity under FSDP2: the N:M groups of {across} run along the sharded dimension "
                             "(dim 0, a transposed weight): leave them out with `exclude`")

    @override
    def claims(self) -> list[Claim]:
        return [weight_claim(t.name, t.param) for t in self.targets]

    def _attach(self) -> None:
        self._detach()
        for index, target in enumerate(self.targets):
            self._handles.append(target.module.register_forward_pre_hook(self._sparsify_hook(index)))
            self._handles.append(target.module.register_forward_hook(self._restore_hook(index), always_call=True))

    def _parameters(self) -> list[nn.Parameter]:
        """The targets' parameters: those kept at ``on_fit_start`` under FSDP2, else the modules' own."""
        return self._params if self._params is not None else [t.param for t in self.targets]

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _sparsify_hook(self, index: int):
        target = self.targets[index]
        dim = nm_group_dim(target)

        def sparsify(module: nn.Module, args):
            dense = module.weight
            mask = nm_mask(dense, self.n, self.m, dim)
            if module.training and torch.is_grad_enabled():
                self._last_masks[index] = mask
            # value W⊙M, gradient straight through to the dense W (W − W·¬M is exact in floating point)
            sparse = dense - (dense * ~mask).detach()
            self._dense[index] = swap_parameter(module, "weight", sparse)  # swapped back by the forward hook

        return sparsify

    def _restore_hook(self, index: int):
        def restore(module: nn.Module, args, output):
            swap_parameter(module, "weight", self._dense.pop(index))

        return restore

    # -- every step ---------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer) -> None:
        changed: Union[Tensor, int] = 0
        total = 0
        shards = None
        for index, (target, param) in enumerate(zip(self.targets, self._parameters())):
            weight, group = local_part(param)  # FSDP2: this rank's rows, whole N:M groups
            shards = shards if group is None else group
            mask = self._last_masks.pop(index, None)
            if mask is None or group is not None:  # the mask of the current weights (this rank's rows)
                mask = nm_mask(weight, self.n, self.m, nm_group_dim(target))
            if self.decay and param.grad is not None:
                # sparse-refined STE: pull pruned weights towards zero so the mask settles
                local_part(param.grad)[0].add_(weight.detach() * ~mask, alpha=self.decay)
            previous = self._previous_masks.get(index)
            if previous is not None:
                changed = changed + (previous != mask).sum()  # stays on the device: no sync per layer
                total += mask.numel()
            self._previous_masks[index] = mask
        if shards is not None and total:  # flips of whole layers: one small all-reduce per step
            flips = torch.stack([torch.as_tensor(changed, dtype=torch.float64),
                                 torch.tensor(total, dtype=torch.float64)]).to(weight.device)
            dist.all_reduce(flips, group=shards)
            changed, total = flips[0], flips[1]
        self._flips = changed / total if total else 0.0

    @override
    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx) -> None:
        if not self._steps.stepped(trainer):
            return  # no optimizer step since the last call (gradient accumulation)
        # mask flips between consecutive steps: high early, settling as SR-STE's decay works
        self.log_metrics(pl_module, {"mask_flip_rate": self._flips, "sparsity": 1.0 - self.density})
        self.show_progress(pl_module, "sparsity", round(1.0 - self.density, 3))
        if step_logs_due(trainer) and tensorboard_writer(trainer) is not None:
            magnitudes = torch.cat([local_part(p)[0].detach().abs().float().flatten() for p in self._parameters()])
            log_histogram(trainer, self.technique, "weight_magnitude", magnitudes)

    # -- the end ------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.finalize()
        if self.export_semi_structured:
            self.export()
        super().on_fit_end(trainer, pl_module)

    @torch.no_grad()
    def finalize(self) -> None:
        """Stop re-computing masks and write them into the weights: the model is now N:M sparse."""
        self._detach()
        for target, param in zip(self.targets, self._parameters()):
            weight = local_part(param)[0]  # FSDP2: this rank's rows
            if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
                continue
            weight.mul_(nm_mask(weight, self.n, self.m, nm_group_dim(target)))
        self._last_masks.clear()
        self._previous_masks.clear()

    def export(self) -> int:
        """Convert 2:4 Linear weights to the semi-structured sparse format; returns how many were.

        Needs CUDA compute capability 8.0+ and fp16/bf16 weights; otherwise says why and converts
        nothing (the weights stay dense tensors holding the 2:4 pattern).
        """
        self.finalize()
        reason = None
        if (self.n, self.m) != (2, 4):
            reason = f"only 2:4 is supported by the semi-structured format (this run is {self.n}:{self.m})"
        elif not torch.cuda.is_available():
            reason = "it needs a CUDA GPU"
        converted = 0
        skipped: list[str] = []
        for target in self.targets if reason is None else []:
            weight = target.param
            if isinstance(weight, DTensor):
                skipped.append(f"{target.name} (an FSDP2 shard: gather the full state dict into an unsharded model "
                               "and export that)")
                continue
            if target.kind != "linear" or target.transposed:
                skipped.append(f"{target.name} (not an nn.Linear)")
                continue
            if not weight.is_cuda:  # after fit too: Lightning's teardown has moved the model to the CPU
                skipped.append(f"{target.name} (on the CPU: move the model to the GPU, e.g. model.cuda(), and call "
                               "NMSparsity.export() again)")
                continue
            if torch.cuda.get_device_capability(weight.device) < (8, 0):
                skipped.append(f"{target.name} (needs a CUDA sm80+ device)")
                continue
            if weight.dtype not in (torch.float16, torch.bfloat16):
                skipped.append(f"{target.name} (dtype {weight.dtype}; needs float16/bfloat16)")
                continue
            try:
                sparse = torch.sparse.to_sparse_semi_structured(weight.detach())
            except (RuntimeError, ValueError) as err:  # shape limits of the kernels
                skipped.append(f"{target.name} ({err})")
                continue
            target.module.weight = nn.Parameter(sparse, requires_grad=False)
            converted += 1
        if reason is not None:
            rank_zero_warn(f"NMSparsity.export converted no weights: {reason}. The weights keep the "
                           f"{self.n}:{self.m} pattern as dense tensors.")
        elif skipped:
            rank_zero_warn(f"NMSparsity.export left {len(skipped)} layer(s) dense: {'; '.join(skipped)}")
        if converted:
            rank_zero_info(f"NMSparsity.export converted {converted} Linear weight(s) to 2:4 semi-structured sparse")
        return converted

    # -- reporting ----------------------------------------------------------------------------
    @override
    def savings(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list[SavingsRow]:
        if not self.targets:
            return []
        inference = self.density  # every targeted layer keeps n of m
        # N:M kernels speed up the forward and the input-gradient matmuls; SR-STE's weight
        # gradient stays dense
        training = (2 * inference + 1) / 3
        return [
            SavingsRow(self.technique, "weights of targeted layers",
                       f"{self.n}:{self.m} ({1 - self.density:.1%} zero)"),
            SavingsRow(self.technique, "inference FLOPs (targeted layers, N:M kernels)",
                       f"{inference:.3f} of dense", inference),
            SavingsRow(self.technique, "training FLOPs (targeted layers, N:M kernels)",
                       f"{training:.3f} of dense", training),
        ]


__all__ = ["NMSparsity", "nm_mask"]
