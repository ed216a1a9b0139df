"""Run by test_infobatch_ddp.py: InfoBatch under DDP on 2 CPU processes (gloo). Writes whether
scores, plans and weights agree across ranks and whether the ranks split each epoch's order.
Usage: python ddp_infobatch_script.py OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lit_efficient import InfoBatch  # noqa: E402
from tests.ddp_runner import gathered  # noqa: E402
from tests.reweighting.test_infobatch import CountingDataset  # noqa: E402
from tests.sparsity.sparse_helpers import MLP  # noqa: E402


class CheckAcrossRanks(pl.Callback):
    def __init__(self, infobatch, path):
        self.infobatch, self.path, self.epochs = infobatch, path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.epochs.append((self.infobatch.order.clone(), self.infobatch.local_order.clone()))

    def on_train_end(self, trainer, pl_module):
        result = {"world_size": dist.get_world_size(), "plans_equal": True, "split_ok": True, "pruned_epochs": 0}
        for name in ("scores", "seen", "multipliers", "order"):
            parts = gathered(getattr(self.infobatch, name).to(torch.float64))
            result[f"{name}_equal"] = all(torch.equal(parts[0], p) for p in parts[1:])
        for order, local in self.epochs:
            orders = gathered(order)
            result["plans_equal"] &= all(torch.equal(orders[0], o) for o in orders[1:])
            locals_ = gathered(local)
            union = torch.cat(locals_)
            result["split_ok"] &= set(union.tolist()) == set(order.tolist()) and len(union) - len(order) < 2
            result["pruned_epochs"] += int(order.numel() < 63)
        params = [gathered(p.detach()) for p in pl_module.parameters()]
        result["params_equal"] = all(torch.equal(ps[0], ps[1]) for ps in params)
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    infobatch = InfoBatch(prune_ratio=0.5)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=5, logger=False,
                         callbacks=[infobatch, CheckAcrossRanks(infobatch, out)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=os.path.dirname(out))
    trainer.fit(MLP(), DataLoader(CountingDataset(63), batch_size=8, shuffle=True))
