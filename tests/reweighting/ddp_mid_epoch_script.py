"""Run by test_infobatch_ddp.py: InfoBatch under DDP on 2 CPU processes (gloo), straight with a
checkpoint after every step, or resumed from one of them. Writes the final weights and scores.
Usage: python ddp_mid_epoch_script.py CKPT_DIR [RESUME_FROM] OUT"""

import json
import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from lit_efficient import InfoBatch  # noqa: E402
from tests.reweighting.test_infobatch import CountingDataset  # noqa: E402
from tests.sparsity.sparse_helpers import MLP  # noqa: E402


class Report(pl.Callback):
    def __init__(self, infobatch, path):
        self.infobatch, self.path = infobatch, path

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            result = {"params": [p.detach().double().flatten().tolist() for p in pl_module.parameters()],
                      "scores": self.infobatch.scores.tolist(), "seen": self.infobatch.seen.tolist(),
                      "step": trainer.global_step}
            with open(self.path, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    ckpts, out = sys.argv[1], sys.argv[-1]
    resume = sys.argv[2] if len(sys.argv) == 4 else None
    torch.set_num_threads(1)
    pl.seed_everything(0)
    infobatch = InfoBatch(prune_ratio=0.5)
    callbacks = [infobatch, Report(infobatch, out)]
    if resume is None:
        callbacks.append(ModelCheckpoint(dirpath=ckpts, every_n_train_steps=1, save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=5, logger=False, callbacks=callbacks,
                         enable_checkpointing=resume is None, enable_progress_bar=False, enable_model_summary=False,
                         deterministic=True, default_root_dir=os.path.dirname(out))
    trainer.fit(MLP(), DataLoader(CountingDataset(63), batch_size=8, shuffle=True), ckpt_path=resume)
