"""Run by test_sparcl_ddp.py: SparCL on Split-digits under DDP on 2 CPU processes (gloo). Writes
whether masks, gradient masks, forgetting records, removed sets and weights agree across ranks.
Usage: python ddp_sparcl_script.py OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from examples.vision.continual import ContinualClassifier, SplitDigits  # noqa: E402
from lit_efficient import SparCL  # noqa: E402
from tests.ddp_runner import equal_on_all_ranks  # noqa: E402


class CompareAcrossRanks(pl.Callback):
    def __init__(self, sparcl, path):
        self.sparcl, self.path = sparcl, path
        self.result = {"masks_equal": True, "grad_masks_equal": True, "removed_equal": True, "events_equal": True}

    def on_train_epoch_end(self, trainer, pl_module):  # after SparCL's: the epoch's removal is done
        s = self.sparcl
        self.result["masks_equal"] &= all(equal_on_all_ranks(m.to(torch.uint8)) for m in s.masks.masks)
        self.result["grad_masks_equal"] &= all(equal_on_all_ranks(g.to(torch.uint8)) for g in s.grad_masks)
        self.result["removed_equal"] &= equal_on_all_ranks(s.removed.to(torch.uint8))
        self.result["events_equal"] &= equal_on_all_ranks(s.events)

    def on_train_end(self, trainer, pl_module):
        s = self.sparcl
        self.result.update(world_size=dist.get_world_size(), updates=s.updates, removed=int(s.removed.sum()),
                           task_size=s.num_samples, task=s.task, sparsity=s.masks.sparsity(),
                           weights_equal=all(equal_on_all_ranks(p.detach()) for p in pl_module.parameters()))
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(self.result, f)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    sparcl = SparCL(sparsity=0.75, gradient_mask_every=3)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=8, logger=False,
                         callbacks=[sparcl, CompareAcrossRanks(sparcl, out)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=os.path.dirname(out))
    trainer.fit(ContinualClassifier(width=8, buffer_size=50), datamodule=SplitDigits(num_tasks=2, epochs_per_task=4))
