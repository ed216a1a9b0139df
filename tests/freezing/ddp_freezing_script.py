"""Run by test_freezing_ddp.py: progressive freezing under DDP on 2 CPU processes (gloo); writes
whether frozen sets and parameters agree across ranks, and the parameters. Usage:
python ddp_freezing_script.py [CACHE_MB] OUT (CACHE_MB > 0: frozen outputs served from a cache)"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_progressive import ViTModule, image_loader  # noqa: E402

from lit_efficient import ProgressiveFreezing  # noqa: E402


class CompareAcrossRanks(pl.Callback):
    def __init__(self, freezing, path):
        self.freezing, self.path = freezing, path

    def on_train_end(self, trainer, pl_module):
        world = dist.get_world_size()
        frozen = torch.tensor([self.freezing.frozen])
        counts = [torch.zeros_like(frozen) for _ in range(world)]
        dist.all_gather(counts, frozen)
        equal = True
        for _, p in pl_module.named_parameters():
            gathered = [torch.zeros_like(p) for _ in range(world)]
            dist.all_gather(gathered, p.detach().contiguous())
            equal &= all(torch.equal(gathered[0], g) for g in gathered[1:])
        cache = self.freezing._cache
        served = torch.tensor([cache.served + cache.served_in_part if cache else 0])
        served_counts = [torch.zeros_like(served) for _ in range(world)]
        dist.all_gather(served_counts, served)
        if trainer.is_global_zero:
            torch.save({n: p.detach().clone() for n, p in pl_module.named_parameters()}, self.path + ".pt")
            with open(self.path, "w") as f:
                json.dump({"world_size": world, "frozen": [int(c) for c in counts], "params_equal": equal,
                           "find_unused": trainer.strategy._ddp_kwargs.get("find_unused_parameters"),
                           "served": [int(c) for c in served_counts]}, f)


if __name__ == "__main__":
    out = sys.argv[-1]
    torch.set_num_threads(1)
    cache_mb = float(sys.argv[1]) if len(sys.argv) > 2 else 0.0
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.2, freeze_level=0.75, cache_frozen_mb=cache_mb)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=24,
                         callbacks=[freezing, CompareAcrossRanks(freezing, out)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(ViTModule(drop_rate=0.0), image_loader(n=64, batch=4))
