"""GraNet, RigL, SET and N:M train real models: timm ViT and ResNet (BatchNorm), a diffusers UNet,
Hugging Face GPT-2 (tied embeddings, Conv1D) and Llama — with exact sparsity on the chosen weights."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sparse_helpers import trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import SET, GraNet, NMSparsity, RigL
from lit_efficient.sparsity.nm import nm_group_dim, nm_mask

CALLBACKS = {
    "granet": lambda **kw: GraNet(sparsity=0.8, prune_end="4st", update_every="2st", **kw),
    "rigl": lambda **kw: RigL(sparsity=0.8, update_every="2st", **kw),
    "set": lambda **kw: SET(sparsity=0.8, update_every="2st", **kw),
    "nm": lambda **kw: NMSparsity(**kw),
}


def build(kind):
    torch.manual_seed(0)
    if kind == "vit":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=32, depth=2,
                                 num_heads=2)
    if kind == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4, in_chans=1, stem_width=8, channels=(8, 16, 32, 64))
    if kind == "unet":
        from diffusers import UNet2DModel

        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"))
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


class Wrapper(pl.LightningModule):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.model = kind, build(kind)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.kind in ("gpt2", "llama"):
            return self.model(input_ids=x, labels=x).loss
        if self.kind == "unet":
            return self.model(x, torch.full((x.shape[0],), 10)).sample.pow(2).mean()
        return nn.functional.cross_entropy(self.model(x), torch.arange(x.shape[0]) % 4)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)


def data(kind):
    g = torch.Generator().manual_seed(0)
    if kind in ("gpt2", "llama"):
        x = torch.randint(0, 64, (16, 16), generator=g)
    else:
        x = torch.rand(16, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x), batch_size=8)


def weights_sparsity(callback):
    if isinstance(callback, NMSparsity):
        return [(t.param, t.param.shape[nm_group_dim(t)]) for t in callback.targets]
    return [(p, None) for p in callback.masks.params]


@pytest.mark.parametrize("name", sorted(CALLBACKS))
@pytest.mark.parametrize("kind", ["vit", "resnet", "unet", "gpt2", "llama"])
def test_real_models_train_to_exact_sparsity(tmp_path, kind, name):
    module = Wrapper(kind)
    callback = CALLBACKS[name]()
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [callback, saver], 6, enable_checkpointing=True).fit(module, data(kind))
    assert torch.isfinite(torch.tensor(float(trainer_loss(module, kind))))
    if isinstance(callback, NMSparsity):
        assert callback.targets
        for t in callback.targets:  # written into the weights at the end of fit
            dim = nm_group_dim(t)
            kept = (t.param != 0).movedim(dim, -1).reshape(-1, 4).sum(1)
            assert (kept <= 2).all() and torch.equal(t.param != 0, nm_mask(t.param, 2, 4, dim) & (t.param != 0))
    else:
        masks = callback.masks
        assert masks.names()
        for mask, param in zip(masks.masks, masks.params):
            assert not param[~mask].any(), "pruned weights are exactly zero"
        # exact within one weight per layer; weights regrown by the last update are still zero
        masked = sum(m.numel() - int(m.sum()) for m in masks.masks)
        assert abs(masked - 0.8 * sum(masks.sizes())) <= len(masks.names())
        assert sum(int((p == 0).sum()) for p in masks.params) >= masked
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    if not isinstance(callback, NMSparsity):
        assert any(k.endswith("sparsity_mask") for k in state["state_dict"])


def trainer_loss(module, kind):
    (x,) = next(iter(data(kind)))
    with torch.no_grad():
        return module.training_step((x,), 0)


@pytest.mark.parametrize("name", ["granet", "rigl", "set"])
def test_gpt2_tied_embedding_stays_tied_and_consistently_masked(tmp_path, name):
    module = Wrapper("gpt2")
    callback = CALLBACKS[name](include=["wte", "h.*.mlp"])
    trainer(tmp_path, [callback], 6).fit(module, data("gpt2"))
    model = module.model
    assert model.lm_head.weight is model.transformer.wte.weight
    (tied,) = [t for t in callback.masks.targets if t.aliases]
    assert tied.param is model.lm_head.weight and "lm_head" in tied.aliases[0]
    mask = tied.module.sparsity_mask
    assert mask.float().mean() < 1 and not model.lm_head.weight[~mask].any()
    # the head computes with the masked matrix: logits equal those of an explicit masked copy
    ids = torch.randint(0, 64, (1, 8))
    hidden = model.transformer(ids).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), hidden @ (model.transformer.wte.weight * mask).t())
