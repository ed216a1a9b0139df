"""Run by test_galore_ddp.py: GaLore under DDP on 2 CPU processes (gloo), each rank on different
data. Writes whether projection bases, moments and weights agree across ranks.
Usage: python ddp_galore_script.py PROJECTION OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lit_efficient import GaLore  # noqa: E402
from tests.ddp_runner import equal_on_all_ranks  # noqa: E402
from tests.sparsity.sparse_helpers import MLP, loader  # noqa: E402


class CompareAcrossRanks(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        projected = opt.projected_params()
        result = {"world_size": dist.get_world_size(), "projected": len(projected), "bases": 0, "state_equal": True,
                  "weights_equal": all(equal_on_all_ranks(p.detach()) for p in pl_module.parameters())}
        for p, _ in projected:
            for key, value in opt.state[p].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    result["bases"] += key.startswith("basis")
                    result["state_equal"] &= equal_on_all_ranks(value.float())
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    projection, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=8, logger=False,
                         callbacks=[GaLore(rank=8, update_proj_gap=3, projection=projection), CompareAcrossRanks(out)],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(MLP(), loader(n=128, batch=8))
