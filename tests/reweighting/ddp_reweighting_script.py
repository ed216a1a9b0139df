"""Run by test_reweighting_ddp.py: one LossReweighting step on 2 CPU processes (gloo), each rank
holding half of the batch, and the single-process gradient of the whole batch to compare with.
Usage: python ddp_reweighting_script.py STRATEGY OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lit_efficient import LossReweighting  # noqa: E402
from lit_efficient.reweighting.loss_reweighting import reweight  # noqa: E402
from tests.reweighting.test_loss_reweighting import Linear, regression_loader  # noqa: E402


class CompareWithOneProcess(pl.Callback):
    def __init__(self, strategy, path):
        self.strategy, self.path, self.result = strategy, path, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the whole global batch, in rank order, as one process would see it
        self.batch = [torch.cat(pl_module.all_gather(t.contiguous()).unbind(0)) for t in batch]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.result is not None:
            return
        grads = [p.grad.detach().clone() for p in pl_module.parameters()]
        reference = Linear()  # the same initial weights
        x, y = self.batch
        assert x.shape[0] == 8
        losses = (reference.net(x).squeeze(1) - y) ** 2
        (reweight(losses.detach(), self.strategy, 0.5) * losses).sum().backward()
        plain = Linear()
        ((plain.net(x).squeeze(1) - y) ** 2).mean().backward()
        self.result = {
            "world_size": dist.get_world_size(),
            "max_diff": max(float((g - p.grad).abs().max()) for g, p in zip(grads, reference.parameters())),
            "differs_from_mean": max(float((g - p.grad).abs().max()) for g, p in zip(grads, plain.parameters())),
        }
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(self.result, f)


if __name__ == "__main__":
    strategy, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                         callbacks=[LossReweighting(strategy=strategy, temperature=0.5, warmup=0),
                                    CompareWithOneProcess(strategy, out)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(Linear(), regression_loader(n=16, batch=4))
