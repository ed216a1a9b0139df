"""A test-sized model, data and Trainer shared by the sparse-training tests."""

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MLP(pl.LightningModule):
    def __init__(self, optimizer="adamw"):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                                 nn.ReLU(), nn.Linear(32, 4))
        self.kind = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = nn.functional.cross_entropy(self.net(x), y, reduction="none")
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self):
        if self.kind == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)


def loader(n=64, batch=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return DataLoader(TensorDataset(x, (x[:, :4].argmax(1))), batch_size=batch)


def trainer(tmp_path, callbacks, steps, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    return pl.Trainer(max_steps=steps, callbacks=callbacks, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, **kwargs)
