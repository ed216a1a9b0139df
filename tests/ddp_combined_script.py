"""Run by test_combinations_ddp.py: trains a main-job combination of callbacks (tests/techniques.py)
under DDP on 2 CPU processes (gloo) and writes whether the model (weights and mask buffers), the
optimizer state and every callback's tensor state agree across ranks.
Usage: python ddp_combined_script.py NAME OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from ddp_runner import equal_on_all_ranks  # noqa: E402
from tests.sparsity.sparse_helpers import MLP, loader  # noqa: E402
from tests.techniques import COMBINATIONS  # noqa: E402


class CompareAcrossRanks(pl.Callback):
    def __init__(self, callbacks, path):
        self.callbacks, self.path = callbacks, path

    def on_train_end(self, trainer, pl_module):
        differing = [k for k, v in pl_module.state_dict().items() if not equal_on_all_ranks(v.detach())]
        optimizer = trainer.optimizers[0]
        for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
            differing += [f"optimizer {i} {k}" for k, v in optimizer.state.get(p, {}).items()
                          if isinstance(v, torch.Tensor) and v.dim() > 0 and not equal_on_all_ranks(v)]
        for callback in self.callbacks:
            for key, value in callback.state_dict().items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and not equal_on_all_ranks(value.float()):
                    differing.append(f"{type(callback).__name__}.{key}")
        frozen = [int(not p.requires_grad) for p in pl_module.parameters()]
        if not equal_on_all_ranks(torch.tensor(frozen)):
            differing.append("frozen set")
        result = {"world_size": dist.get_world_size(), "global_step": trainer.global_step, "differing": differing,
                  "frozen": frozen,
                  "states": {type(c).__name__: sorted(c.state_dict()) for c in self.callbacks}}
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0)
    callbacks = COMBINATIONS[name]()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=16,
                         callbacks=[*callbacks, CompareAcrossRanks(callbacks, out)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(MLP(), loader(n=32, batch=8))  # 2 steps an epoch on each rank, fewer when InfoBatch prunes
