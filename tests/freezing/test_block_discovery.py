"""Block discovery on plain custom models: what runs before the first block (an embedding, a stem,
a position parameter) joins block 0 on the first training step, freezes with it and leaves the
optimizer, and a resume from a checkpoint taken after block 0 froze is exact."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import ProgressiveFreezing
from lit_efficient.freezing.blocks import discover_blocks
from tests.freezing.test_progressive import make_trainer


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Classifier(pl.LightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)


class TokensModuleList(Classifier):
    """(a) token embedding and a learnt position parameter, a ModuleList of blocks, a head."""

    def __init__(self, mid=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 16)
        self.pos = nn.Parameter(torch.randn(1, 8, 16) * 0.02)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.mid = nn.Linear(16, 16) if mid else None  # a layer of no block between two blocks
        self.head = nn.Linear(16, 4)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for i, block in enumerate(self.blocks):
            x = block(self.mid(x) if self.mid is not None and i == 1 else x)
        return self.head(x.mean(1))


class FeaturesSequential(Classifier):
    """(b) a Linear + LayerNorm embedding, a Sequential of identical blocks, a head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16))
        self.blocks = nn.Sequential(Block(), Block(), Block())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class ConvStages(Classifier):
    """(c) a stem convolution and its BatchNorm, a Sequential of Sequential stages, a pooled head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.stages = nn.Sequential(*(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                      for _ in range(3)))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.stages(torch.relu(self.bn_stem(self.conv_stem(x)))).mean((2, 3)))


def loader(kind, n=16, batch=8):
    g = torch.Generator().manual_seed(1)
    x = {"tokens": lambda: torch.randint(0, 32, (n, 8), generator=g),
         "features": lambda: torch.randn(n, 12, generator=g),
         "images": lambda: torch.rand(n, 1, 8, 8, generator=g)}[kind]()
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (n,), generator=g)), batch_size=batch)


CASES = {  # module, data, block 0's modules after the first step, parameters joined by themselves
    "embedding_modulelist": (TokensModuleList, "tokens", ["embed", "blocks.0"], ["pos"]),
    "embedding_sequential": (FeaturesSequential, "features", ["embed", "blocks.0"], []),
    "stem_conv_stages": (ConvStages, "images", ["conv_stem", "bn_stem", "stages.0"], []),
}
STEM = {"embedding_modulelist": ["embed", "pos"], "embedding_sequential": ["embed"],
        "stem_conv_stages": ["conv_stem", "bn_stem"]}


def test_generic_layout_keeps_a_stack_of_identical_blocks_and_leaves_a_networks_head():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert [b.name for b in discover_blocks(mlp)] == ["0", "2"]  # the output layer is the head
    assert [b.name for b in discover_blocks(nn.Sequential(Block(), Block(), Block()))] == ["0", "1", "2"]
    assert [b.name for b in discover_blocks(nn.Sequential(Block(), Block(), nn.Linear(16, 2)))] == ["0", "1"]
    assert [b.name for b in discover_blocks(FeaturesSequential())] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.name for b in discover_blocks(ConvStages())] == ["stages.0", "stages.1", "stages.2"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_runs_before_the_first_block_joins_it_and_freezes_with_it(tmp_path, case, caplog):
    make_module, data, first_modules, first_params = CASES[case]
    module = make_module()
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")  # 3 blocks: after steps 4, 7, 10
    parts = [getattr(module, name) for name in STEM[case]]
    stem = [p for part in parts for p in ([part] if isinstance(part, nn.Parameter) else part.parameters())]
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if freezing.frozen and "at" not in seen:  # block 0 just froze
                seen["at"] = trainer.global_step
                seen["weights"] = [p.detach().clone() for p in stem]
                seen["buffers"] = {n: b.clone() for n, b in pl_module.named_buffers() if n.startswith("bn_stem.")}
            if freezing.frozen:
                in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
                assert all(not p.requires_grad and p.grad is None and id(p) not in in_optimizer for p in stem)

    with caplog.at_level(logging.INFO):
        trainer = make_trainer(tmp_path, [freezing, Watch()], -1, max_epochs=6)  # 2 batches an epoch
        trainer.fit(module, loader(data))
    assert freezing.frozen == len(freezing.blocks) == 3
    assert [n for n, _ in freezing.blocks[0].modules] == first_modules
    assert freezing.blocks[0].stem == len(first_modules) - 1  # the joined modules are never cached
    names = [n for n, _ in freezing.blocks[0].params]
    assert all(n in names for n in first_params)
    assert {id(p) for p in stem} <= {id(p) for _, p in freezing.blocks[0].params}
    ids = [id(p) for b in freezing.blocks for _, p in b.params]
    assert len(ids) == len(set(ids)), "a parameter in two blocks"
    assert seen["at"] == 4
    assert all(torch.equal(a, p) for a, p in zip(seen["weights"], stem)), "the stem moved after freezing"
    assert bool(seen["buffers"]) == (case == "stem_conv_stages")  # BatchNorm statistics stopped too
    assert all(torch.equal(b, dict(module.named_buffers())[n]) for n, b in seen["buffers"].items())
    assert sum("join block 0" in r.getMessage() for r in caplog.records) == 1
    assert freezing.state_dict()["joined_modules"] == first_modules[:-1]


def test_user_blocks_and_known_layouts_get_what_runs_before_them_too(tmp_path):
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=1.0, blocks=["blocks.*"])
    module = TokensModuleList()
    make_trainer(tmp_path, [freezing], 6).fit(module, loader("tokens"))
    assert [n for n, _ in freezing.blocks[0].modules] == ["embed", "blocks.0"]
    assert freezing.frozen == 3 and not module.embed.weight.requires_grad and not module.pos.requires_grad

    class LlamaLike(TokensModuleList):  # the Llama layout (embed_tokens, layers), plus a projection
        def __init__(self):
            Classifier.__init__(self)
            torch.manual_seed(0)
            self.embed_tokens, self.proj_in = nn.Embedding(32, 16), nn.Linear(16, 16)
            self.layers, self.head = nn.ModuleList(Block() for _ in range(2)), nn.Linear(16, 4)

        def forward(self, tokens):
            x = self.proj_in(self.embed_tokens(tokens))
            for layer in self.layers:
                x = layer(x)
            return self.head(x.mean(1))

    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5)
    module = LlamaLike()
    make_trainer(tmp_path, [freezing], 6).fit(module, loader("tokens"))
    assert [n for n, _ in freezing.blocks[0].modules] == ["embed_tokens", "proj_in", "layers.0"]
    assert freezing.frozen == 1 and not module.proj_in.weight.requires_grad and module.head.weight.requires_grad


def test_a_tied_embedding_that_joins_block_0_keeps_training_through_the_head(tmp_path):
    class TiedLM(TokensModuleList):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 32, bias=False)
            self.head.weight = self.embed.weight

        def training_step(self, batch, batch_idx):
            tokens, _ = batch
            x = self.embed(tokens) + self.pos
            for block in self.blocks:
                x = block(x)
            return nn.functional.cross_entropy(self.head(x).flatten(0, 1), tokens.flatten())

    module, outputs = TiedLM(), []
    module.embed.register_forward_hook(lambda m, a, out: outputs.append(out.requires_grad))
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=2 / 3)  # block 0 after step 3
    trainer = make_trainer(tmp_path, [freezing], 6)
    trainer.fit(module, loader("tokens"))
    assert freezing.frozen == 2 and [n for n, _ in freezing.blocks[0].modules] == ["embed", "blocks.0"]
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert module.embed.weight.requires_grad and id(module.embed.weight) in in_optimizer  # through the head
    assert not module.pos.requires_grad and id(module.pos) not in in_optimizer
    assert outputs[0] and not outputs[-1]  # the embedding itself runs without a graph once frozen


def test_a_layer_of_no_block_between_two_blocks_is_refused(tmp_path):
    module = TokensModuleList(mid=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="autograd prefix: 'mid' runs after the first block"):
        make_trainer(tmp_path, [ProgressiveFreezing()], 4).fit(module, loader("tokens"))
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "nothing trained"


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_after_block_0_froze_matches_the_uninterrupted_run(tmp_path, case):
    make_module, data, first_modules, _ = CASES[case]

    def run(ckpt=None):
        pl.seed_everything(0)
        module = make_module()
        freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")  # after steps 4, 7, 10
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=6, save_top_k=-1,
                                save_on_train_epoch_end=True)
        trainer = make_trainer(tmp_path, [freezing, saver], -1, max_epochs=12, deterministic=True,
                               enable_checkpointing=True)
        trainer.fit(module, loader(data, n=8, batch=8), ckpt_path=ckpt)  # one-batch epochs: the data order restores
        return module, freezing, trainer

    straight, straight_freezing, straight_trainer = run()
    ckpt = tmp_path / "ckpts" / "epoch=5-step=6.ckpt"
    (state,) = [s for k, s in torch.load(ckpt, weights_only=True)["callbacks"].items() if "ProgressiveFreezing" in k]
    assert state["frozen"] == 1 and state["joined_modules"] == first_modules[:-1]
    resumed, resumed_freezing, resumed_trainer = run(ckpt=str(ckpt))
    assert resumed_freezing.frozen == straight_freezing.frozen == 3
    assert [n for n, _ in resumed_freezing.blocks[0].modules] == first_modules  # joined once, not twice
    assert resumed_freezing.state_dict() == straight_freezing.state_dict()
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a_opt, b_opt = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert [g["params"] for g in a_opt["param_groups"]] == [g["params"] for g in b_opt["param_groups"]]
    assert a_opt["state"].keys() == b_opt["state"].keys()
    for index, values in a_opt["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b_opt["state"][index][key])), (index, key)
