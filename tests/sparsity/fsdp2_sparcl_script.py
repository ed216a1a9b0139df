"""Run by test_sparcl_fsdp2.py: SparCL on Split-digits on 2 CPU processes (gloo), under FSDP2
(``ModelParallelStrategy``, every conv and linear layer its own ``fully_shard`` unit) or DDP. Writes
the whole final state (weights and masks), the whole gradient masks and SparCL's sample records.
Usage: python fsdp2_sparcl_script.py STRATEGY OPTIONS_JSON OUT   (STRATEGY: fsdp2 or ddp)"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from examples.vision.continual import ContinualClassifier, SplitDigits  # noqa: E402
from lit_efficient import SparCL  # noqa: E402


class ShardedContinualClassifier(ContinualClassifier):
    def configure_model(self):
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


if __name__ == "__main__":
    strategy, options, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    sparcl = SparCL(sparsity=0.75, gradient_mask_every=3)
    callbacks = [sparcl]
    if options.get("save_every"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=options["checkpoints"], every_n_train_steps=options["save_every"],
                                         save_top_k=-1))
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=options.get("epochs", 8),
                         logger=False, callbacks=callbacks, enable_checkpointing=bool(options.get("save_every")),
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=os.path.dirname(out))
    # each rank's rehearsal buffer holds its own samples, and a multi-process checkpoint keeps rank 0's
    # module hooks' entries only: the resume test trains without rehearsal
    model = ShardedContinualClassifier(method=options.get("method", "derpp"), width=8, buffer_size=50)
    trainer.fit(model, datamodule=SplitDigits(num_tasks=2, epochs_per_task=4), ckpt_path=options.get("resume"))
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().tolist()
             for k, v in model.state_dict().items()}
    grad_masks = [g.tolist() for g in sparcl._whole_grad_masks()]  # every rank takes part
    traffic = getattr(trainer.strategy, "traffic", None)  # ddp_exact_compression: bytes all-reduced over the run
    traffic = [dict(traffic.total_sent), dict(traffic.total_whole)] if traffic is not None else None
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump({"step": trainer.global_step, "state": state, "grad_masks": grad_masks,
                       "updates": sparcl.updates, "removed": sparcl.removed.tolist(), "events": sparcl.events.tolist(),
                       "sparsity": sparcl.masks.sparsity(), "task": sparcl.task,
                       "traffic": traffic}, f)
