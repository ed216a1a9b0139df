import copy

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import ProgressiveFreezing
from lit_efficient.freezing.blocks import discover_blocks
from lit_efficient.freezing.freezer import remove_from_optimizer
from lit_efficient.freezing.schedules import adaptive_frozen_prefix, freezeout_times, linear_frozen_count


# -- pure functions -------------------------------------------------------------------------------
def test_freezeout_times():
    assert freezeout_times(4, 0.8, "linear") == pytest.approx([0.8, 0.85, 0.9, 0.95])
    assert freezeout_times(2, 0.8, "cubic") == pytest.approx([0.512, 0.9 ** 3])
    assert freezeout_times(2, 0.5, "squared") == pytest.approx([0.25, 0.75 ** 2])


def test_linear_frozen_count():
    assert [linear_frozen_count(f, 4, 0.5, 1.0) for f in (0.0, 0.49, 0.5, 0.75, 1.0)] == [0, 0, 0, 2, 4]
    assert linear_frozen_count(1.0, 4, 0.0, 0.5) == 2


def test_adaptive_prefix_stops_at_the_first_block_above_the_threshold():
    assert adaptive_frozen_prefix([0.1, 0.5, 0.05, 0.3], 50) == 1
    assert adaptive_frozen_prefix([0.01, 0.02, 0.9, 0.8], 50) == 2
    assert adaptive_frozen_prefix([0.5, 0.1], 50) == 0
    assert adaptive_frozen_prefix([], 50) == 0


def test_remove_from_optimizer_by_identity_frees_state():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))  # equal values, different identity
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    assert remove_from_optimizer(opt, [a]) == 1
    assert opt.param_groups[0]["params"] == [] and opt.param_groups[1]["params"] == [b]
    assert a not in opt.state and b in opt.state
    opt.state_dict()  # still serialisable
    opt.step()


# -- discovery ------------------------------------------------------------------------------------
def tiny_models():
    import timm
    from diffusers import UNet2DModel
    from timm.models.resnet import BasicBlock, ResNet
    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "vit": VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=3,
                                 num_heads=2),
        "resnet": ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10),
        "convnext": timm.create_model("convnext_atto", pretrained=False, num_classes=10),
        "unet": UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D")),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)),
        "llama": LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2)),
        "bert": BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)),
    }


EXPECTED = {
    "vit": (["patch_embed", "norm_pre", "blocks.0"], ["blocks.1", "blocks.2"], ["cls_token", "pos_embed"]),
    "resnet": (["conv1", "bn1", "layer1.0"], ["layer2.0", "layer3.0", "layer4.0"], []),
    "convnext": (["stem", "stages.0"], ["stages.1", "stages.2", "stages.3"], []),
    "unet": (["time_proj", "time_embedding", "conv_in", "down_blocks.0"], ["down_blocks.1"], []),
    "gpt2": (["transformer.wte", "transformer.wpe", "transformer.h.0"], ["transformer.h.1"], []),
    "llama": (["model.embed_tokens", "model.layers.0"], ["model.layers.1"], []),
    "bert": (["embeddings", "encoder.layer.0"], ["encoder.layer.1"], []),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_discovery(kind):
    model = tiny_models()[kind]
    blocks = discover_blocks(model)
    first, rest, params = EXPECTED[kind]
    assert [n for n, _ in blocks[0].modules] == first
    assert [b.name for b in blocks[1:]] == rest
    names = [n for n, _ in blocks[0].params]
    assert all(p in names for p in params)
    # blocks never share a parameter and never include the head
    ids = [id(p) for b in blocks for _, p in b.params]
    assert len(ids) == len(set(ids))


# -- training -------------------------------------------------------------------------------------
class ViTModule(pl.LightningModule):
    def __init__(self, optimizer="adamw", drop_rate=0.1):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        self.model = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=4, embed_dim=32, depth=4,
                                       num_heads=2, drop_rate=drop_rate)
        self.kind = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        if self.kind == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5)}


def image_loader(n=32, batch=8):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 8, 8, generator=g)
    return DataLoader(TensorDataset(x, (x.mean((1, 2, 3)) * 40).long() % 4), batch_size=batch)


def make_trainer(tmp_path, callbacks, steps, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("logger", False)
    return pl.Trainer(max_steps=steps, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)


class Snapshots(pl.Callback):
    def __init__(self):
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_frozen_prefix_stays_bit_identical_and_leaves_the_optimizer(tmp_path, optimizer):
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.25, freeze_level=0.5)
    module, snaps = ViTModule(optimizer), Snapshots()
    trainer = make_trainer(tmp_path, [freezing, snaps], 16)
    trainer.fit(module, image_loader())
    assert freezing.frozen == 2
    frozen = {n for b in freezing.blocks[:2] for n, _ in b.params}
    assert "model.cls_token" in frozen and "model.pos_embed" in frozen and "model.patch_embed.proj.weight" in frozen
    params = dict(module.named_parameters())
    optimizer_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in params.items():
        if name in frozen:
            assert not p.requires_grad and p.grad is None and id(p) not in optimizer_ids
            assert p not in trainer.optimizers[0].state
    # the linear ramp froze block 0 after step 16·(0.25 + 0.75·0.5) = 10 (weight decay and momentum
    # included, nothing moves from then on) and block 1 at the end
    for name, _ in freezing.blocks[0].params:
        assert not torch.equal(snaps.weights[1][name], snaps.weights[10][name]), name
        assert torch.equal(snaps.weights[10][name], snaps.weights[16][name]), name
    trained = [n for n in params if n not in frozen]
    assert all(id(params[n]) in optimizer_ids for n in trained)
    assert not torch.equal(snaps.weights[10]["model.head.weight"], snaps.weights[16]["model.head.weight"])
    fc1 = "model.blocks.3.mlp.fc1.weight"
    assert not torch.equal(snaps.weights[10][fc1], snaps.weights[16][fc1])
    trainer.optimizers[0].state_dict()
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4  # stepped every epoch, groups intact


def test_no_graph_is_built_through_the_frozen_prefix(tmp_path):
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5)
    module = ViTModule()
    make_trainer(tmp_path, [freezing], 8).fit(module, image_loader())
    assert freezing.frozen == 2
    seen = {}
    module.model.blocks[1].register_forward_hook(lambda m, a, out: seen.setdefault("frozen", out))
    module.model.blocks[2].register_forward_hook(lambda m, a, out: seen.setdefault("trainable", out))
    module.train()
    module.model(torch.rand(2, 1, 8, 8)).sum().backward()
    assert seen["frozen"].grad_fn is None and not seen["frozen"].requires_grad
    assert seen["trainable"].grad_fn is not None


@pytest.mark.parametrize("bad", [{"t0": 0.0}, {"t0": 1.5}, {"warp": "quartic"}, {"schedule": "random"},
                                 {"freeze_level": 0.0}, {"percentile": 0}, {"blocks": [""]},
                                 {"tied_embeddings": "untie"}, {"check_every": 0}])
def test_bad_arguments(bad):
    (argument,) = bad
    with pytest.raises(ValueError, match=f"`{argument}`"):
        ProgressiveFreezing(**bad)


def test_unknown_block_glob_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="`blocks` pattern 'model.stages.*' matches no"):
        make_trainer(tmp_path, [ProgressiveFreezing(blocks=["model.stages.*"])], 2).fit(ViTModule(), image_loader())


def test_blocks_that_are_not_a_prefix_fail_before_the_first_update(tmp_path):
    module = ViTModule()
    before = copy.deepcopy(module.state_dict())
    freezing = ProgressiveFreezing(blocks=["model.blocks.0", "model.blocks.2"])  # blocks.1 runs between them
    with pytest.raises(ValueError, match="autograd prefix: 'model.blocks.1.norm1' runs after the first block"):
        make_trainer(tmp_path, [freezing], 4).fit(module, image_loader())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "nothing trained"


def test_user_blocks_that_form_a_prefix_train(tmp_path):
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=1.0,
                                   blocks=["model.patch_embed", "model.cls_token", "model.pos_embed", "model.blocks.*"])
    make_trainer(tmp_path, [freezing], 8).fit(ViTModule(), image_loader())
    assert [b.name for b in freezing.blocks][:4] == ["model.patch_embed", "model.cls_token", "model.pos_embed",
                                                     "model.blocks.0"]
    assert freezing.frozen == len(freezing.blocks) == 7


def test_batchnorm_statistics_of_frozen_blocks_stop_changing(tmp_path):
    from timm.models.resnet import BasicBlock, ResNet

    class ResNetModule(ViTModule):
        def __init__(self):
            pl.LightningModule.__init__(self)
            torch.manual_seed(0)
            self.model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=4, in_chans=1)
            self.kind = "sgd"

    module = ResNetModule()
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5)
    stats = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats[trainer.global_step] = {n: b.clone() for n, b in pl_module.named_buffers() if "running_mean" in n}
            if freezing.frozen:
                assert not pl_module.model.bn1.training and pl_module.model.layer4[0].bn1.training

    make_trainer(tmp_path, [freezing, Watch()], 16).fit(module, image_loader(n=64, batch=16))
    assert freezing.frozen == 2  # block 0 (stem + layer1.0) after step 8
    for name in ("model.bn1.running_mean", "model.layer1.0.bn1.running_mean"):
        assert not torch.equal(stats[1][name], stats[8][name])
        assert torch.equal(stats[8][name], stats[16][name]), name
    assert not torch.equal(stats[8]["model.layer4.0.bn1.running_mean"], stats[16]["model.layer4.0.bn1.running_mean"])


def test_resume_mid_schedule_matches_the_uninterrupted_run(tmp_path):
    def run(ckpt=None):
        pl.seed_everything(0)
        module = ViTModule(drop_rate=0.0)  # Lightning does not restore the global RNG that dropout draws from
        freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=9, save_top_k=-1,
                                save_on_train_epoch_end=True)
        trainer = make_trainer(tmp_path, [freezing, saver], -1, max_epochs=16, deterministic=True,
                               enable_checkpointing=True)
        trainer.fit(module, image_loader(n=8, batch=8), ckpt_path=ckpt)  # one-batch epochs
        return module, freezing, trainer

    straight, straight_freezing, straight_trainer = run()
    ckpt = tmp_path / "ckpts" / "epoch=8-step=9.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert any("ProgressiveFreezing" in k for k in state["callbacks"])
    resumed, resumed_freezing, resumed_trainer = run(ckpt=str(ckpt))
    # block i of 4 freezes at 0.3 + 0.7·i/4 of 16 steps: at 5, 8, 11 and 14; the checkpoint holds 2 frozen
    assert straight_freezing.frozen == resumed_freezing.frozen == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    groups = [[id(p) for p in g["params"]] for g in resumed_trainer.optimizers[0].param_groups]
    names = {id(p): n for n, p in resumed.named_parameters()}
    straight_names = {id(p): n for n, p in straight.named_parameters()}
    straight_groups = [[straight_names[i] for i in g] for g in
                       [[id(p) for p in g["params"]] for g in straight_trainer.optimizers[0].param_groups]]
    assert [[names[i] for i in g] for g in groups] == straight_groups


class LMModule(pl.LightningModule):
    def __init__(self, arch="gpt2"):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        if arch == "gpt2":
            self.model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
        else:
            self.model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                      num_hidden_layers=3, num_attention_heads=2,
                                                      num_key_value_heads=2))

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_loader(n=32, batch=8):
    return DataLoader(TensorDataset(torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(0))),
                      batch_size=batch)


@pytest.mark.parametrize("tied", ["train", "freeze"])
def test_gpt2_tied_embedding(tmp_path, tied):
    module, snaps = LMModule(), Snapshots()
    embedded = []
    module.model.transformer.wte.register_forward_hook(lambda m, a, o: embedded.append(o.grad_fn))
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=2 / 3, tied_embeddings=tied)
    trainer = make_trainer(tmp_path, [freezing, snaps], 12)
    trainer.fit(module, token_loader())
    model = module.model
    assert model.lm_head.weight is model.transformer.wte.weight, "still tied"
    assert freezing.frozen == 2
    wte = "model.transformer.wte.weight"
    optimizer_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    h0 = "model.transformer.h.0.attn.c_attn.weight"
    assert torch.equal(snaps.weights[6][h0], snaps.weights[12][h0])
    if tied == "train":  # keeps learning through the head only
        assert model.transformer.wte.weight.requires_grad and id(model.transformer.wte.weight) in optimizer_ids
        assert not torch.equal(snaps.weights[6][wte], snaps.weights[12][wte])
        # the input side runs without a graph once block 0 froze (after step 6): no backward through it
        assert embedded[0] is not None and embedded[-1] is None
    else:
        assert not model.transformer.wte.weight.requires_grad
        assert torch.equal(snaps.weights[6][wte], snaps.weights[12][wte])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_language_models_train_with_a_frozen_prefix(tmp_path, arch):
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
    module = LMModule(arch)
    make_trainer(tmp_path, [freezing], 12).fit(module, token_loader())
    assert freezing.frozen == 3 and 0 < freezing.frozen_fraction() < 1


def test_adaptive_freezes_a_prefix_from_gradient_norm_changes(tmp_path):
    freezing = ProgressiveFreezing(schedule="adaptive", freeze_start="2st", check_every="2st", percentile=75,
                                   freeze_level=0.75)
    make_trainer(tmp_path, [freezing], 24).fit(ViTModule(), image_loader())
    assert 1 <= freezing.frozen <= 3
    assert len(freezing.previous_norms) == len(freezing.blocks) - freezing.frozen


class UNetModule(pl.LightningModule):
    """A tiny diffusers UNet trained to predict noise at random timesteps."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        self.unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                norm_num_groups=8, layers_per_block=1,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        noise = torch.randn_like(x)
        t = torch.randint(0, 100, (x.shape[0],))
        return nn.functional.mse_loss(self.unet(x + noise, t).sample, noise)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_unet_prefix_runs_without_a_graph(tmp_path):
    module = UNetModule()
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5)
    make_trainer(tmp_path, [freezing], 8).fit(module, image_loader())
    assert freezing.frozen == 1
    seen = {}
    module.unet.down_blocks[0].register_forward_hook(lambda m, a, out: seen.setdefault("down0", out))
    module.unet.time_embedding.register_forward_hook(lambda m, a, out: seen.setdefault("temb", out))
    module.unet(torch.rand(2, 1, 8, 8), torch.tensor([3, 5])).sample.sum().backward()
    assert seen["down0"][0].grad_fn is None and seen["temb"].grad_fn is None
    assert module.unet.down_blocks[1].resnets[0].conv1.weight.grad is not None
    assert module.unet.conv_in.weight.grad is None


def test_trainable_gradients_survive_freezing_changes_under_torch_compile(tmp_path):
    module = ViTModule(drop_rate=0.0)
    module.model = torch.compile(module.model, backend="aot_eager")
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.75,
                                   blocks=["model._orig_mod.patch_embed", "model._orig_mod.cls_token",
                                           "model._orig_mod.pos_embed", "model._orig_mod.blocks.*"])
    checked = []

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            trainable = [p for g in optimizer.param_groups for p in g["params"]]
            assert trainable and all(p.grad is not None for p in trainable), f"step {trainer.global_step}"
            checked.append(freezing.frozen)

    make_trainer(tmp_path, [freezing, Check()], 12).fit(module, image_loader())
    assert len(set(checked)) >= 3, "several freezing changes happened under compile"


def test_tensorboard_and_savings(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5)
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(tmp_path, [freezing], 24, logger=logger, log_every_n_steps=1).fit(ViTModule(), image_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0}).Reload()
    frozen = [e.value for e in events.Scalars("efficient/freezing/frozen_fraction")]
    assert frozen[0] == 0.0 and frozen[-1] == pytest.approx(freezing.frozen_fraction()) and frozen[-1] > 0
    assert frozen == sorted(frozen)
    assert [e.value for e in events.Scalars("efficient/freezing/frozen_blocks")][-1] == 2
    assert all(e.value > 0 for e in events.Scalars("efficient/freezing/samples_per_second"))
    rows = {r.quantity: r for r in freezing.savings(None, None)}
    assert rows["blocks frozen at the end"].value.startswith("2/4")
    skipped = rows["parameter-steps frozen (weight gradients and optimizer work skipped)"]
    assert 0 < 1 - skipped.ratio < freezing.frozen_fraction()
    assert "throughput, last vs first tenth of the run" in rows


def test_freezeout_lr_annealing_scales_each_blocks_step(tmp_path):
    from lit_efficient.freezing.schedules import freezeout_lr_factor

    assert freezeout_lr_factor(0, 10) == 1.0 and freezeout_lr_factor(5, 10) == pytest.approx(0.5)
    assert freezeout_lr_factor(10, 10) == 0.0 and freezeout_lr_factor(12, 10) == 0.0

    class SGDModule(ViTModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)  # plain SGD: a step is -lr·grad

    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.5, warp="linear", lr_annealing=True)
    grads, snaps = {}, Snapshots()

    class Grads(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads[trainer.global_step] = {n: p.grad.clone() for n, p in pl_module.named_parameters()
                                          if p.grad is not None}

    module = SGDModule(drop_rate=0.0)
    make_trainer(tmp_path, [freezing, Grads(), snaps], 16).fit(module, image_loader())
    # block 0 freezes at 0.5·16 = 8 steps; the step with index 3 (the 4th) runs at factor ½(1 + cos(π·3/8))
    name = "model.blocks.0.mlp.fc1.weight"
    step = snaps.weights[4][name] - snaps.weights[3][name]
    torch.testing.assert_close(step, -0.05 * freezeout_lr_factor(3, 8) * grads[3][name], rtol=1e-4, atol=1e-7)
    head = "model.head.weight"  # not in a block: full steps
    torch.testing.assert_close(snaps.weights[4][head] - snaps.weights[3][head], -0.05 * grads[3][head],
                               rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="`lr_annealing`"):
        ProgressiveFreezing(schedule="linear", lr_annealing=True)


def test_reduce_lr_on_plateau_keeps_working_after_freezing(tmp_path):
    class PlateauModule(ViTModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
            schedule = {"scheduler": plateau, "monitor": "train_loss", "interval": "step"}
            return {"optimizer": opt, "lr_scheduler": schedule}

    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.75)
    trainer = make_trainer(tmp_path, [freezing], 12)
    trainer.fit(PlateauModule(drop_rate=0.0), image_loader())
    assert freezing.frozen == 3
    optimizer = trainer.optimizers[0]
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] < 1e-2  # it kept stepping
    trainer.lr_scheduler_configs[0].scheduler.state_dict()
