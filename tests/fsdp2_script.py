"""Run by the FSDP2 tests: a fit of the test MLP with callbacks from ``tests/techniques.py`` on 2 CPU
processes (gloo), sharded with FSDP2 (``fully_shard`` on every Linear and the root, in
``configure_model``) through ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
or under plain DDP for comparison. Rank r takes samples r, r+2, ... of the same global batches one
process takes (``one_process``), so results compare with one process. Writes the final full weights.

Usage: python fsdp2_script.py ENTRY STRATEGY OPTIONS_JSON OUT   (STRATEGY: fsdp2, ddp or exact: DDP through
``ddp_exact_compression``)"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tests.sparsity.sparse_helpers import MLP, loader  # noqa: E402
from tests.techniques import ENTRIES  # noqa: E402

GLOBAL_BATCH = 16


def _stem_freezeout():
    from lit_efficient import FreezeOut

    # net.0 runs before the first block: it must join block 0 (under FSDP2 without reading autograd's leaves)
    return [FreezeOut(t0=0.3, warp="linear", blocks=["net.2", "net.4"])]  # net.6, the head, trains


def _linear_progressive():
    from lit_efficient import ProgressiveFreezing

    return [ProgressiveFreezing(schedule="linear", freeze_start="2st")]  # LinearFreezing: 1 of 3 blocks at step 8


def _mix():
    from lit_efficient import FreezeOut, LossReweighting, RigL

    # the FSDP2 column of the reliability matrix: sparse masks, freezing and per-sample weights at once
    return [RigL(sparsity=0.8, update_every="3st", stop=0.9), FreezeOut(t0=0.5, warp="linear"),
            LossReweighting(warmup="3st", temperature=0.5)]


def _exact_mix():
    from lit_efficient import GaLore, LossReweighting, RigL

    # ddp_exact_compression's mix: projected, masked and whole gradients in the same buckets
    return [GaLore(rank=8, update_proj_gap=3, include=["net.0", "net.2"]),
            RigL(sparsity=0.8, update_every="3st", stop=0.9, include=["net.4"]), LossReweighting(warmup="3st")]


def _galore_adaptive():
    from lit_efficient import AutoFreeze, GaLore

    # AutoFreeze reads the gradient norms GaLore's projections would change: those steps send them whole
    return [GaLore(rank=8, update_proj_gap=3), AutoFreeze(freeze_start="2st", check_every="2st", percentile=90)]


FACTORIES = {**ENTRIES, "freezeout_stem": _stem_freezeout, "progressive_linear": _linear_progressive, "mix": _mix,
             "exact_mix": _exact_mix, "galore_adaptive": _galore_adaptive}


def _galore(**options):
    from lit_efficient import GaLore

    # net.0 (64×16) and net.2 (64×64) project on the right, net.4 (32×64) on the left
    return lambda: [GaLore(**{"rank": 8, "update_proj_gap": 3, **options})]


FACTORIES.update(galore_randomized=_galore(projection="randomized_svd"), galore_random=_galore(projection="random"),
                 galore_fira=_galore(fira=True), galore_8bit=_galore(eight_bit=True),
                 galore_fira_shard_basis=_galore(fira=True, shard_basis=True),
                 # every Linear, the head (4×32, left) too: on 3 ranks its rows split 2, 2 and 0
                 galore_every_linear=_galore(rank=3, include=["net.0", "net.2", "net.4", "net.6"], fira=True,
                                             shard_basis=True))


class ShardedMLP(MLP):
    """The test MLP, each Linear its own FSDP2 unit (parameters sharded on dim 0), the rest at the root."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class TrafficRecorder(pl.Callback):
    """Under ``ddp_exact_compression``: the bytes each optimizer step handed to the all-reduce, per
    technique."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        traffic = trainer.strategy.traffic  # the strategy's report, added after this, closes the step
        self.steps.append({"step": trainer.global_step + 1, "sent": dict(traffic.step_sent),
                           "whole": dict(traffic.step_whole)})


def full_state(model) -> dict:
    """Every parameter and buffer whole (DTensor shards gathered), as lists."""
    out = {}
    for key, value in model.state_dict().items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[key] = value.detach().cpu().tolist()
    return out


def facts(trainer) -> dict:
    """What the techniques did, to compare across strategies: blocks frozen, batches the frozen-output
    cache served, and how many parameters hold optimizer state (frozen ones must have none)."""
    out = {"with_state": sum(1 for state in trainer.optimizers[0].state.values() if state)}
    from torch.distributed.tensor import DTensor

    params = list(trainer.lightning_module.parameters())  # sharded at the end: none left gathered (0 = one process)
    out["gathered"] = sum(not isinstance(p, DTensor) for p in params) if any(isinstance(p, DTensor) for p in params) \
        else 0
    for callback in trainer.callbacks:
        if isinstance(callback, TrafficRecorder):
            out["traffic"] = callback.steps
            out["savings"] = [[r.quantity, r.value, r.ratio] for r in trainer.strategy.report.savings(trainer, None)]
            out["sent_shown"] = trainer.progress_bar_metrics.get("sent%")  # the progress bar's entry at the end
        masks = getattr(callback, "masks", None)
        if masks is not None and hasattr(masks, "spans"):  # sparse training: whole-layer counts, this rank's part
            out.update(updates=callback.updates, nonzeros=masks.nonzeros(), sizes=masks.sizes(),
                       mask_entries_here=sum(m.numel() for m in masks.masks))
        if hasattr(callback, "frozen"):
            out["frozen"] = callback.frozen
            out["block_0"] = [name for name, _ in callback.blocks[0].params]
            out["freed_state_bytes"] = callback.freed_state_bytes  # on this rank: half of one process's here
            cache = getattr(callback, "_cache", None)
            if cache is not None:
                out["served"] = cache.served
        if getattr(callback, "technique", None) == "galore":  # bytes of each state entry on this rank
            from lit_efficient.core.distributed import local_bytes

            state = callback.optimizers[0].state
            out["galore"] = {t.name: {key: local_bytes(value) for key, value in state.get(t.param, {}).items()
                                      if isinstance(value, torch.Tensor) and value.dim() > 0}
                             for t in callback.targets}
    return out


def fit(entry: str, strategy: str, options: dict, root: str):
    """Train with ``FACTORIES[entry]()`` on 2 ranks (``strategy``) or in one process (``"one"``)."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    steps, epochs = options.get("steps", 12), options.get("epochs")
    ranks = options.get("ranks", 2)  # 3: the MLP's dims 64, 32 and 4 split unevenly (4 rows: 2, 2 and 0)
    batch = GLOBAL_BATCH if ranks == 2 else 8 * ranks  # each rank takes 8 samples of a global batch
    data = loader(n=options.get("samples", 4 * batch), batch=batch).dataset
    kwargs = dict(max_epochs=epochs) if epochs else dict(max_steps=steps)
    if strategy == "one":
        trainer_kwargs, model = dict(devices=1), MLP()
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        shards = not options.get("full_checkpoint", False)  # else checkpoints are one whole file
        if strategy == "fsdp2":
            chosen = ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1,
                                           save_distributed_checkpoint=shards)
        elif strategy == "exact":  # DDP sending only what the techniques read
            chosen = "ddp_exact_compression"
        else:
            chosen = "ddp"
        trainer_kwargs = dict(devices=ranks, strategy=chosen, use_distributed_sampler=False)
        model = ShardedMLP() if strategy == "fsdp2" else MLP()
    precision = options.get("precision", "32-true")
    callbacks = FACTORIES[entry]()
    if strategy == "exact":
        callbacks.append(TrafficRecorder())
    if options.get("save_every"):  # checkpoints inside epochs (one per ``save_every`` steps, all kept)
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=options["checkpoints"], every_n_train_steps=options["save_every"],
                                         save_top_k=-1, save_weights_only=False))
    logger = False
    if options.get("logger"):  # TensorBoard events in ROOT/tb/version_0, every step
        from lightning.pytorch.loggers import TensorBoardLogger

        logger = TensorBoardLogger(root, name="tb")
    if logger:
        kwargs["log_every_n_steps"] = 1
    trainer = pl.Trainer(accelerator="cpu", logger=logger, callbacks=callbacks,
                         enable_checkpointing=bool(options.get("save_every")), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, precision=precision,
                         accumulate_grad_batches=options.get("accumulate", 1), **trainer_kwargs, **kwargs)
    if strategy == "one":
        train = DataLoader(data, batch_size=batch)
    else:
        sampler = DistributedSampler(data, num_replicas=ranks, rank=trainer.global_rank, shuffle=False)
        train = DataLoader(data, batch_size=batch // ranks, sampler=sampler)
    trainer.fit(model, train, ckpt_path=options.get("resume"))
    return trainer, model


if __name__ == "__main__":
    entry, strategy, options, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    trainer, model = fit(entry, strategy, options, os.path.dirname(out))
    state = full_state(model)  # every rank takes part in gathering the shards
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump({"world_size": trainer.world_size, "step": trainer.global_step, "state": state,
                       "facts": facts(trainer)}, f)
