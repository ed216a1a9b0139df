"""A small causal language model (transformers Llama or GPT-2, random init) as a LightningModule.

The project's standard "pydoc LM" task: a 4.2M-parameter Llama on ``pydoc_data.topics``, AdamW lr 1e-3,
cosine with 5% warm-up over 600 steps. From the repository root::

    lit-efficient fit --config examples/nlp/lm_pydoc.yaml
    lit-efficient fit --config examples/nlp/lm_pydoc_gpt2.yaml        # tied head, Conv1D layers
    lit-efficient fit --config examples/nlp/lm_pydoc.yaml --trainer.callbacks+=lit_efficient.GaLore

On several processes with FSDP2 (``configure_model`` shards each decoder block), e.g. GaLore + RigL +
FreezeOut on 2 CPU processes::

    lit-efficient fit --config examples/nlp/lm_pydoc.yaml --config examples/nlp/combined/lm_pydoc_fsdp2.yaml

``training_step`` returns ``{"loss": losses.mean(), "sample_losses": losses}`` with one loss per
sequence (mean token cross-entropy over its non-ignored tokens), the per-sample contract that
LossReweighting and InfoBatch read.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric

from examples.common import total_training_steps, training_output, warmup_cosine
from examples.nlp.common import attached_datamodule, decay_groups

IGNORE_INDEX = -100


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence next-token cross-entropy.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``. Returns ``(losses, counts)``: the mean loss
    over each sequence's non-ignored target tokens, shape ``(B,)``, and how many tokens that
    mean is over. A sequence with no target token gets loss 0 (and count 0).
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),  # fp32 loss under mixed precision
        targets.reshape(-1),
        reduction="none",
        ignore_index=ignore_index,
    ).view(targets.shape)
    valid = targets != ignore_index
    counts = valid.sum(dim=1)
    losses = (token * valid).sum(dim=1) / counts.clamp(min=1)
    return losses, counts


class CausalLM(LightningModule):
    """Next-token prediction with a randomly initialised transformers decoder in ``self.model``.

    Args:
        arch: ``"llama"`` (``LlamaForCausalLM``: RMSNorm, SwiGLU, RoPE, ``nn.Linear``) or
            ``"gpt2"`` (``GPT2LMHeadModel``: LayerNorm, GELU MLP, learned positions, ``Conv1D``
            layers whose weights are stored transposed).
        vocab_size: must be >= the datamodule's tokenizer vocabulary (default 2048).
        hidden_size: model width (default 256).
        intermediate_size: MLP width (default 688; for gpt2 this is ``n_inner``).
        num_layers: decoder blocks (default 4).
        num_heads: attention heads (default 4); must divide ``hidden_size``.
        max_position_embeddings: longest sequence (default 128).
        tie_word_embeddings: share the input embedding with the output head. ``None`` (default)
            takes the architecture's convention: untied for llama (as in the standard task), tied for gpt2.
        dropout: dropout in the decoder (default 0.0; gpt2 would otherwise use 0.1).
        lr: peak AdamW learning rate (default 1e-3; 3e-3 is too high on pydoc: best val loss 4.599
            against 4.391 at 1e-3 over 600 steps, measured in this project's peer study).
        weight_decay: AdamW decay on weight matrices only (default 0.1).
        warmup_fraction: linear warm-up fraction of all optimizer steps (default 0.05).
        min_lr_ratio: the cosine ends at this fraction of ``lr`` (default 0.0).
    """

    def __init__(
        self,
        arch: Literal["llama", "gpt2"] = "llama",
        vocab_size: int = 2048,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_layers: int = 4,
        num_heads: int = 4,
        max_position_embeddings: int = 128,
        tie_word_embeddings: Optional[bool] = None,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_fraction: float = 0.05,
        min_lr_ratio: float = 0.0,
    ) -> None:
        super().__init__()
        if arch not in ("llama", "gpt2"):
            raise ValueError(f"`arch` must be 'llama' or 'gpt2', got {arch!r}.")
        for name, value in (
            ("vocab_size", vocab_size), ("hidden_size", hidden_size), ("intermediate_size", intermediate_size),
            ("num_layers", num_layers), ("num_heads", num_heads), ("max_position_embeddings", max_position_embeddings),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if hidden_size % num_heads:
            raise ValueError(f"`num_heads` ({num_heads}) must divide `hidden_size` ({hidden_size}).")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout}.")
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"`warmup_fraction` must be in [0, 1), got {warmup_fraction}.")
        self.save_hyperparameters()
        tie = (arch == "gpt2") if tie_word_embeddings is None else tie_word_embeddings
        self.model = self._build(arch, tie)
        self.val_loss = MeanMetric()  # weighted by token count: the token-mean loss

    def _build(self, arch: str, tie: bool) -> torch.nn.Module:
        h = self.hparams
        if arch == "llama":
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(
                vocab_size=h.vocab_size,
                hidden_size=h.hidden_size,
                intermediate_size=h.intermediate_size,
                num_hidden_layers=h.num_layers,
                num_attention_heads=h.num_heads,
                max_position_embeddings=h.max_position_embeddings,
                attention_dropout=h.dropout,
                tie_word_embeddings=tie,
            )
            return LlamaForCausalLM(config)
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=h.vocab_size,
            n_embd=h.hidden_size,
            n_inner=h.intermediate_size,
            n_layer=h.num_layers,
            n_head=h.num_heads,
            n_positions=h.max_position_embeddings,
            resid_pdrop=h.dropout,
            embd_pdrop=h.dropout,
            attn_pdrop=h.dropout,
            tie_word_embeddings=tie,
            # GPT-2's defaults (50256) lie outside our vocabulary; we use no special tokens
            bos_token_id=None,
            eos_token_id=None,
        )
        return GPT2LMHeadModel(config)

    # model/data agreement ----------------------------------------------------------------

    def setup(self, stage: str) -> None:
        dm = attached_datamodule(self)
        data_vocab = getattr(dm, "vocab_size", None)
        if data_vocab is not None and data_vocab > self.hparams.vocab_size:
            raise ValueError(
                f"The datamodule's tokenizer has {data_vocab} tokens but CausalLM(vocab_size="
                f"{self.hparams.vocab_size}); set --model.init_args.vocab_size >= {data_vocab}."
            )
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.hparams.max_position_embeddings:
            raise ValueError(
                f"The datamodule's seq_len={seq_len} exceeds CausalLM(max_position_embeddings="
                f"{self.hparams.max_position_embeddings})."
            )

    # steps ---------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        logits = self(input_ids, batch.get("attention_mask"))
        return sequence_losses(logits, labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        losses, _ = self._losses(batch)
        # the batch mean of sequence means equals the token mean here: all blocks are full length
        return training_output(self, losses)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses, counts = self._losses(batch)
        self.val_loss.update(losses, weight=counts.to(losses.dtype))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synchronised across ranks by torchmetrics
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): shard every decoder block as its own unit (its
        weights are gathered just for its forward and backward), then the rest (embeddings, final norm,
        head) at the root. Without a device mesh (one device, DDP) the model stays as it is. The layers
        are built in ``__init__``, so callbacks find them in ``setup``; only the sharding happens here."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # configure_model runs again for validate/test after fit
            return
        data_parallel = mesh["data_parallel"]
        blocks = self.model.model.layers if self.hparams.arch == "llama" else self.model.transformer.h
        for block in blocks:
            fully_shard(block, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        optimizer = torch.optim.AdamW(decay_groups(self, h.weight_decay), lr=h.lr)
        scheduler = warmup_cosine(optimizer, total_training_steps(self.trainer), h.warmup_fraction, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def num_parameters(self) -> int:
        """Unique parameters (a tied head is counted once)."""
        return sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())


__all__ = ["CausalLM", "sequence_losses", "IGNORE_INDEX"]
