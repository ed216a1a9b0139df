"""The GaLore callback: converting the module's AdamW with schedulers rebound, targets, real
learning on a Llama-style LM and a timm ViT, the per-layer mode, clipping, bad input. Resume is in
test_resume_every_technique.py, DDP in test_galore_ddp.py."""

import inspect

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from examples.nlp.lm import CausalLM
from examples.vision.data import DigitsDataModule
from examples.vision.vit import ViTClassifier
from lit_efficient import GaLore, GaLoreAdamW
from lit_efficient.core.time import Time
from tests.sparsity.sparse_helpers import MLP, loader, trainer


class Scheduled(MLP):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 100)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_the_modules_adamw_becomes_galore_with_its_scheduler(tmp_path):
    callback, model = GaLore(rank=8, update_proj_gap=5), Scheduled()
    t = trainer(tmp_path, [callback], 10)
    with pytest.warns() as record:
        t.fit(model, loader(64, 16))
    assert not [w for w in record if "lr_scheduler" in str(w.message)]  # the rebound scheduler sees steps
    opt = t.optimizers[0]
    assert isinstance(opt, GaLoreAdamW) and t.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 10 / 100))  # the schedule drove the new optimizer
    assert opt.param_groups[0]["weight_decay"] == 0.05
    # the hidden Linear layers are projected; the head, biases stay plain AdamW
    projected = {id(p) for p, _ in opt.projected_params()}
    assert [t.name for t in callback.targets] == ["net.0", "net.2", "net.4"]
    assert projected == {id(model.net[i].weight) for i in (0, 2, 4)}
    assert "basis_right" not in opt.state[model.net[6].weight] and "basis_left" not in opt.state[model.net[0].bias]
    assert "configure_optimizers" not in model.__dict__  # the module's own method again


def test_each_return_form_of_configure_optimizers_is_converted(tmp_path):
    class Lists(MLP):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 3)]

    t = trainer(tmp_path, [GaLore(rank=4)], 4)
    t.fit(Lists(), loader(64, 16))
    assert isinstance(t.optimizers[0], GaLoreAdamW) and t.lr_scheduler_configs[0].scheduler.optimizer is t.optimizers[0]


def tokens_loader(n=32, length=16, vocab=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return DataLoader([{"input_ids": row} for row in ids], batch_size=8)


@pytest.mark.parametrize("options", [dict(), dict(projection="random", eight_bit=True)])
def test_the_lm_learns_and_embeddings_and_head_stay_adamw(tmp_path, options):
    torch.manual_seed(0)
    lm = CausalLM(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  max_position_embeddings=16, tie_word_embeddings=False, lr=3e-3, warmup_fraction=0.0)
    callback = GaLore(rank=8, update_proj_gap=20, scale=1.0, **options)
    losses = []

    class Track(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, [callback, Track()], 60).fit(lm, tokens_loader())
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:4]) / 4
    names = [t.name for t in callback.targets]
    assert len(names) == 14 and all(".layers." in n for n in names)  # q k v o gate up down x 2 layers


def test_a_timm_vit_learns_digits(tmp_path):
    torch.manual_seed(0)
    vit = ViTClassifier(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                        mlp_ratio=2.0, lr=3e-3, weight_decay=0.05)
    callback = GaLore(rank=8, update_proj_gap=20, scale=1.0)
    t = pl.Trainer(max_epochs=6, callbacks=[callback], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(vit, datamodule=DigitsDataModule(batch_size=64, seed=0))
    # chance is 0.1; plain AdamW reaches 0.29 in these 6 epochs, GaLore rank 8 0.38
    assert float(t.callback_metrics["val/acc"]) > 0.25
    assert all(".blocks." in f".{t.name}." for t in callback.targets) and len(callback.targets) == 8


def test_layerwise_matches_the_ordinary_update(tmp_path):
    results = []
    for layerwise in (False, True):
        pl.seed_everything(0)
        model = MLP()
        trainer(tmp_path, [GaLore(rank=8, update_proj_gap=3, layerwise=layerwise)], 7).fit(model, loader(64, 16))
        results.append([p.detach().clone() for p in model.parameters()])
        assert all(p.grad is None for p in model.parameters()) or not layerwise  # gradients were freed
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,match", [(dict(accumulate_grad_batches=2), "accumulate_grad_batches"),
                                          (dict(gradient_clip_val=1.0), "gradient_clip_val"),
                                          (dict(strategy="ddp", devices=1, accelerator="cpu"), "DDPStrategy")])
def test_layerwise_refuses_what_it_cannot_see(tmp_path, kwargs, match, monkeypatch):
    # the DDP case sets launch variables and a process group in this process: undo both afterwards,
    # or later subprocess DDP tests inherit them
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.raises(ValueError, match=match):
            trainer(tmp_path, [GaLore(rank=4, layerwise=True)], 2, **kwargs).fit(MLP(), loader(32, 8))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_clipping_and_accumulation_work_in_the_ordinary_mode(tmp_path):
    model = MLP()
    trainer(tmp_path, [GaLore(rank=4)], 4, gradient_clip_val=0.1, accumulate_grad_batches=2).fit(model, loader(64, 8))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"), (dict(rank=40), "larger than"), (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(proj_type="diag"), "proj_type"), (dict(projection="qr"), "projection"),
    (dict(target_modules=["nothing.here"]), "`target_modules`"), (dict(include=["nothing.here"]), "`include`"),
])
def test_bad_input_is_refused_before_training(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [GaLore(**kwargs)], 2).fit(MLP(), loader(32, 8))


def selected(tmp_path, callback):
    """The names ``callback`` targets on the test MLP (its ``setup`` alone, no training)."""
    model = MLP()
    callback.setup(trainer(tmp_path, [callback], 1), model, "fit")
    callback.teardown(None, model, "fit")
    return [t.name for t in callback.targets]


def test_include_and_its_alias_target_modules_select_the_same_matrices(tmp_path):
    chosen = ["net.0", "re:net\\.[24]"]
    by_include, by_alias = GaLore(rank=4, include=chosen), GaLore(rank=4, target_modules=chosen)
    assert selected(tmp_path, by_include) == selected(tmp_path, by_alias) == ["net.0", "net.2", "net.4"]
    assert by_include.include == by_include.target_modules == by_alias.include == by_alias.target_modules == chosen
    assert selected(tmp_path, GaLore(rank=4, include="net.2", target_modules=["net.2"])) == ["net.2"]  # same: fine
    assert GaLore(rank=4).include == GaLore(rank=4).target_modules == ["all-linear"]  # the default, either name
    with pytest.raises(ValueError, match="`include`.*`target_modules`"):
        GaLore(rank=4, include=["net.0"], target_modules=["net.2"])


def test_every_argument_reads_back_and_rebuilds_the_same_callback():
    """LightningCLI and the settings table read each constructor argument back by its name."""
    callback = GaLore(rank=4, update_proj_gap="7st", scale=2.0, proj_type="left", projection="random",
                      target_modules=["net.0"], exclude=["net.4"], fira=True, layerwise=True, seed=3)
    names = list(inspect.signature(GaLore.__init__).parameters)[1:]
    values = {name: getattr(callback, name) for name in names}
    assert values["update_proj_gap"] == 7 and values["include"] == values["target_modules"] == ["net.0"]
    rebuilt = GaLore(**values)
    assert {name: getattr(rebuilt, name) for name in names} == values


def test_update_proj_gap_accepts_steps():
    assert GaLore(rank=4, update_proj_gap="5st").update_proj_gap == 5
    assert GaLore(rank=4, update_proj_gap="5st").group_options["update_proj_gap"] == 5
    assert GaLore(rank=4, update_proj_gap=5).update_proj_gap == 5
    try:
        batches = Time.parse("5ba", "update_proj_gap")
    except ValueError:
        pytest.skip("lit_efficient.core.time does not parse Composer's 'ba' yet")
    if batches.unit == "st":
        assert GaLore(rank=4, update_proj_gap="5ba").update_proj_gap == 5


@pytest.mark.parametrize("spec", ["0.5dur", "2ep", "1.5ep", "5 steps", "0st", 2.5, True])
def test_update_proj_gap_other_than_steps_is_refused_naming_it(spec):
    with pytest.raises(ValueError, match="`update_proj_gap`"):
        GaLore(rank=4, update_proj_gap=spec)


def test_only_adam_optimizers_are_converted(tmp_path):
    class SGDModule(MLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="AdamW/Adam"):
        trainer(tmp_path, [GaLore(rank=4)], 2).fit(SGDModule(), loader(32, 8))


def test_state_and_savings_are_reported(tmp_path):
    callback = GaLore(rank=4, update_proj_gap=2)
    t = trainer(tmp_path, [callback], 6, log_every_n_steps=1)
    t.fit(MLP(), loader(96, 16))
    m = t.callback_metrics
    assert 0 < float(m["efficient/galore/state_ratio"]) < 1
    assert 0 <= float(m["efficient/galore/subspace_overlap"]) <= 1.0001
    rows = {row.quantity: row for row in callback.savings(t, t.lightning_module)}
    # projected matrices save most; the head and biases keep AdamW state
    assert rows["state of projected matrices"].ratio < rows["optimizer state"].ratio < 1
    assert rows["optimizer state, peak over the run"].ratio < 1 and rows["optimizer state, mean over the run"].ratio < 1


def test_the_savings_report_the_runs_peak_and_mean_when_freezing_empties_the_optimizer(tmp_path):
    """FreezeOut freezes every projected matrix by the end and takes it out of the optimizer (the head
    trains on with AdamW): the projected state at the end is none, and says so; the peak and mean over
    the run still show what GaLore saved."""
    from lit_efficient import FreezeOut

    callback = GaLore(rank=4, update_proj_gap=2)
    t = trainer(tmp_path, [callback, FreezeOut(t0=0.3, warp="linear", blocks=["net.0", "net.2", "net.4"])],
                24, log_every_n_steps=2)
    t.fit(MLP(), loader(96, 16))
    assert not t.optimizers[0].projected_params()
    rows = {row.quantity: row for row in callback.savings(t, t.lightning_module)}
    projected = rows["state of projected matrices"]
    assert "none at the end" in projected.value and projected.ratio is None
    assert rows["optimizer state"].ratio == pytest.approx(1.0)  # the head's AdamW state alone
    assert 0 < rows["optimizer state, peak over the run"].ratio < 1
    assert 0 < rows["optimizer state, mean over the run"].ratio <= 1


def test_bf16_mixed_precision_trains(tmp_path):
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    t = trainer(tmp_path, [GaLore(rank=4, update_proj_gap=2)], 4, precision="bf16-mixed")
    t.fit(model, loader(64, 16))
    opt = t.optimizers[0]
    for p, _ in opt.projected_params():
        bases = [v for k, v in opt.state[p].items() if k in ("basis_left", "basis_right")]
        assert bases and all(b.dtype == torch.float32 for b in bases)  # computed in fp32 under autocast
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_half_precision_weights_resume_bit_exactly(tmp_path, precision="bf16-true"):
    """Lightning loads the optimizer state through torch, which casts it to each weight's dtype: the
    fp32 moments and bases of bf16 matrices must come back exactly, and the run continue exactly
    (fp16 weights: tests/lowrank/test_galore_optim.py; the test MLP diverges in pure fp16)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None):
        pl.seed_everything(0)
        model = MLP()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1,
                                save_on_train_epoch_end=True)
        t = pl.Trainer(max_epochs=8, precision=precision, callbacks=[GaLore(rank=8, update_proj_gap=3), saver],
                       logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        t.fit(model, loader(16, 16), ckpt_path=ckpt)  # one-batch epochs: the data order restores exactly
        return model, t

    straight, a = run()
    resumed, b = run(str(tmp_path / "ckpts" / "epoch=3-step=4.ckpt"))  # mid-gap: bases from step 3
    assert next(straight.parameters()).dtype == torch.bfloat16
    for x, y in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(x, y)
    for (p, _), (q, _) in zip(a.optimizers[0].projected_params(), b.optimizers[0].projected_params()):
        for key, value in a.optimizers[0].state[p].items():
            if isinstance(value, torch.Tensor):
                other = b.optimizers[0].state[q][key]
                assert other.dtype == value.dtype and torch.equal(other, value), key
