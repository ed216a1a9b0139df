"""A timm Vision Transformer classifier as a LightningModule: the project's standard digits ViT.

The defaults are the test-sized 8x8 digits ViT (patch 2, width 64, 4 blocks, 4 heads, ~0.14M
parameters; AdamW lr 3e-3, weight decay 0.05, cosine over all steps). The network is
``self.model``, so parameters are named like timm's (``model.blocks.0.mlp.fc1.weight``) and
callbacks select them with globs such as ``"model.blocks.*.mlp.fc*"``.

``training_step`` follows the project's per-sample loss contract: it returns
``{"loss": losses.mean(), "sample_losses": losses}`` with per-sample cross-entropy, so the
reweighting and data-pruning callbacks work on it unchanged.

Run it from the repository root::

    lit-efficient fit --config examples/vision/vit_digits.yaml
    python examples/vision/train.py fit --config examples/vision/vit32_digits.yaml
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from timm.models.vision_transformer import VisionTransformer
from torchmetrics.classification import MulticlassAccuracy

from examples.common import total_training_steps, warmup_cosine


class ViTClassifier(LightningModule):
    """timm ``VisionTransformer`` trained with AdamW and a per-step cosine schedule.

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio:
            passed to ``timm.models.vision_transformer.VisionTransformer``.
        lr: peak AdamW learning rate (default 3e-3).
        weight_decay: AdamW weight decay on every parameter, as in the baseline (default 0.05).
        warmup_fraction: fraction of all optimizer steps spent in linear warm-up, in ``[0, 1)``
            (default 0: pure cosine, the baseline's schedule).
    """

    def __init__(
        self,
        img_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"`img_size` ({img_size}) must be a multiple of `patch_size` ({patch_size})")
        if embed_dim % num_heads != 0:
            raise ValueError(f"`embed_dim` ({embed_dim}) must be a multiple of `num_heads` ({num_heads})")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}")
        self.save_hyperparameters()
        self.model = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        # micro average = plain accuracy, the figure every benchmark reports (torchmetrics defaults to macro)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        # Per-sample losses are the contract that LossReweighting/InfoBatch/SparCL read.
        losses = F.cross_entropy(logits, y, reduction="none")
        loss = losses.mean()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return {"loss": loss, "sample_losses": losses}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = warmup_cosine(optimizer, total_training_steps(self.trainer), hp.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
