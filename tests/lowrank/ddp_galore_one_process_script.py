"""Run by test_galore_ddp.py: GaLore under DDP on 2 CPU processes (gloo), each rank on its half of
the same global batches that one process trains on (rank r takes samples r, r+2, ...), with basis
refreshes inside the run. Writes the final weights.
Usage: python ddp_galore_one_process_script.py OPTIONS_JSON OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lit_efficient import GaLore  # noqa: E402
from tests.sparsity.sparse_helpers import MLP, loader  # noqa: E402

STEPS, GLOBAL_BATCH = 24, 16


def fit(options: dict, devices: int, root: str) -> MLP:
    """Train the MLP with ``GaLore(**options)`` on ``devices`` processes; every global batch is the same."""
    torch.set_num_threads(1)
    data = loader(n=STEPS * GLOBAL_BATCH, batch=GLOBAL_BATCH).dataset
    kwargs = dict(strategy="ddp", use_distributed_sampler=False) if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_steps=STEPS, logger=False,
                         callbacks=[GaLore(rank=8, update_proj_gap=5, **options)], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kwargs)
    if devices > 1:
        sampler = DistributedSampler(data, num_replicas=devices, rank=trainer.global_rank, shuffle=False)
        train = DataLoader(data, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    else:
        train = DataLoader(data, batch_size=GLOBAL_BATCH)
    model = MLP()
    trainer.fit(model, train)
    assert trainer.optimizers[0].refreshes == 3 * 5  # 3 matrices (not the head), bases from steps 0, 5, 10, 15, 20
    return model


if __name__ == "__main__":
    options, out = json.loads(sys.argv[1]), sys.argv[2]
    model = fit(options, 2, os.path.dirname(out))
    if torch.distributed.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({k: v.tolist() for k, v in model.state_dict().items()}, f)
