"""Run by test_sparse_ddp.py: trains with a sparse callback under DDP on 2 CPU processes (gloo)
and writes whether masks and weights agree across ranks. Usage: python ddp_sparse_script.py NAME OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparse_helpers import MLP, loader  # noqa: E402

from ddp_runner import equal_on_all_ranks  # noqa: E402
from lit_efficient import SET, GraNet, NMSparsity, RigL  # noqa: E402
from lit_efficient.sparsity.nm import nm_group_dim, nm_mask  # noqa: E402

MAKERS = {
    "granet": lambda: GraNet(sparsity=0.8, initial_density=0.5, prune_end="12st", update_every="3st"),
    "rigl": lambda: RigL(sparsity=0.8, update_every="3st", stop=0.9),
    "set": lambda: SET(sparsity=0.8, update_every="3st", stop=0.9),
    "nm": lambda: NMSparsity(n=1, m=4),
}


def masks_and_weights(sparse):
    if isinstance(sparse, NMSparsity):  # the mask is a function of the (dense) weights
        return [(nm_mask(t.param, sparse.n, sparse.m, nm_group_dim(t)), t.param) for t in sparse.targets]
    return list(zip(sparse.masks.masks, sparse.masks.params))


def density(sparse, pairs):
    return sum(int(m.sum()) for m, _ in pairs) / sum(m.numel() for m, _ in pairs)


class CompareAcrossRanks(pl.Callback):
    def __init__(self, sparse, path):
        self.sparse, self.path = sparse, path

    def on_train_end(self, trainer, pl_module):
        pairs = masks_and_weights(self.sparse)
        result = {"updates": getattr(self.sparse, "updates", None), "masks_equal": True, "weights_equal": True,
                  "world_size": dist.get_world_size()}
        for mask, param in pairs:
            for tensor, key in ((mask.to(torch.uint8), "masks_equal"), (param.detach(), "weights_equal")):
                result[key] &= equal_on_all_ranks(tensor)
        result["density"] = density(self.sparse, pairs)
        if trainer.is_global_zero:
            with open(self.path, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    name, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    sparse = MAKERS[name]()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=16,
                         callbacks=[sparse, CompareAcrossRanks(sparse, out)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=os.path.dirname(out))
    trainer.fit(MLP(), loader(n=128, batch=8))
