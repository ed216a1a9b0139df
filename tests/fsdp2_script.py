"""Run by the FSDP2 tests: a fit of the test MLP with callbacks from ``tests/techniques.py`` on 2 CPU
processes (gloo), sharded with FSDP2 (``fully_shard`` on every Linear and the root, in
``configure_model``) through ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``,
or under plain DDP for comparison. Rank r takes samples r, r+2, ... of the same global batches one
process takes (``one_process``), so results compare with one process. Writes the final full weights.

Usage: python fsdp2_script.py ENTRY STRATEGY OPTIONS_JSON OUT   (STRATEGY: fsdp2 or ddp)"""

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


FACTORIES = {**ENTRIES, "freezeout_stem": _stem_freezeout}


class ShardedMLP(MLP):
    """The test MLP, each Linear its own FSDP2 unit (parameters sharded on dim 0), the rest at the root."""

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


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
    for callback in trainer.callbacks:
        if hasattr(callback, "frozen"):
            out["frozen"] = callback.frozen
            out["block_0"] = [name for name, _ in callback.blocks[0].params]
            out["freed_state_bytes"] = callback.freed_state_bytes  # on this rank: half of one process's here
            cache = getattr(callback, "_cache", None)
            if cache is not None:
                out["served"] = cache.served
    return out


def fit(entry: str, strategy: str, options: dict, root: str):
    """Train with ``FACTORIES[entry]()`` on 2 ranks (``strategy``) or in one process (``"one"``)."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    steps, epochs = options.get("steps", 12), options.get("epochs")
    data = loader(n=options.get("samples", 4 * GLOBAL_BATCH), batch=GLOBAL_BATCH).dataset
    kwargs = dict(max_epochs=epochs) if epochs else dict(max_steps=steps)
    if strategy == "one":
        trainer_kwargs, model = dict(devices=1), MLP()
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        chosen = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp"
        trainer_kwargs = dict(devices=2, strategy=chosen, use_distributed_sampler=False)
        model = ShardedMLP() if strategy == "fsdp2" else MLP()
    precision = options.get("precision", "32-true")
    callbacks = FACTORIES[entry]()
    if options.get("save_every"):  # checkpoints inside epochs (one per ``save_every`` steps, all kept)
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=options["checkpoints"], every_n_train_steps=options["save_every"],
                                         save_top_k=-1, save_weights_only=False))
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=callbacks,
                         enable_checkpointing=bool(options.get("save_every")), enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root, precision=precision,
                         accumulate_grad_batches=options.get("accumulate", 1), **trainer_kwargs, **kwargs)
    if strategy == "one":
        train = DataLoader(data, batch_size=GLOBAL_BATCH)
    else:
        sampler = DistributedSampler(data, num_replicas=2, rank=trainer.global_rank, shuffle=False)
        train = DataLoader(data, batch_size=GLOBAL_BATCH // 2, sampler=sampler)
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
