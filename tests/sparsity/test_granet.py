import lightning.pytorch as pl
import pytest
import torch
from sparse_helpers import MLP, loader, trainer

from lit_efficient.sparsity.granet import GraNet, granet_density, regrow_fraction_at


def test_schedule_functions():
    assert granet_density(0, 10, 110, 1.0, 0.1) == 1.0
    assert granet_density(110, 10, 110, 1.0, 0.1) == pytest.approx(0.1)
    assert granet_density(60, 10, 110, 1.0, 0.1) == pytest.approx(1 - (0.9 + (0 - 0.9) * 0.125))
    assert regrow_fraction_at(0, 100, 0.5, 0.005) == 0.5
    assert regrow_fraction_at(100, 100, 0.5, 0.005) == 0.005


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_final_sparsity_is_exact_at_prune_end_and_stays(tmp_path, optimizer):
    granet = GraNet(sparsity=0.8, prune_end="30st", update_every="7st")  # 30 is no multiple of 7
    model = MLP(optimizer)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen[trainer.global_step] = granet.masks.density()
            assert granet.masks.is_applied()

    trainer(tmp_path, [granet, Watch()], 60).fit(model, loader())
    masks = granet.masks
    target = round(0.2 * sum(masks.sizes()))
    assert sum(masks.nonzeros()) == target
    assert all(seen[s] == target / sum(masks.sizes()) for s in range(30, 61)), "sparsity must hold after prune_end"
    assert seen[29] > 0.2  # not before
    assert [t.name for t in masks.targets] == ["net.0", "net.2", "net.4"]  # the head is exempt
    # pruned weights are exactly zero in the trained model
    for t, m in zip(masks.targets, masks.masks):
        assert (t.param[~m] == 0).all()


def test_sparse_to_sparse_starts_at_initial_density(tmp_path):
    granet = GraNet(sparsity=0.9, initial_density=0.5, prune_end="20st", update_every="5st", distribution="uniform")
    model = MLP()
    trainer(tmp_path, [granet], 1).fit(model, loader())
    assert granet.masks.density() == pytest.approx(0.5, abs=1 / sum(granet.masks.sizes()))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"initial_density": 0.0}, "initial_density"),
     ({"initial_density": 0.05}, "initial_density"), ({"prune_start": "50st", "prune_end": "10st"}, "prune_end"),
     ({"regrow_fraction": 1.5}, "regrow_fraction"), ({"growth": "magic"}, "growth"),
     ({"distribution": "normal"}, "distribution"), ({"update_every": "0st"}, "update_every"),
     ({"prune_end": "ten"}, "prune_end")],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GraNet(**kwargs)


def test_unknown_glob_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="`include` pattern 'net.9' matches no module"):
        trainer(tmp_path, [GraNet(include=["net.9"])], 2).fit(MLP(), loader())


def test_resume_mid_schedule_matches_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None):
        pl.seed_everything(0)
        granet = GraNet(sparsity=0.8, prune_end="30st", update_every="5st", growth="gradient")
        model = MLP()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=17, save_top_k=-1,
                                save_on_train_epoch_end=True)
        t = trainer(tmp_path, [granet, saver], -1, max_epochs=40, deterministic=True,
                    enable_checkpointing=True)
        t.fit(model, loader(n=16, batch=16), ckpt_path=ckpt)  # one-batch epochs: data order restores exactly
        return model, granet

    straight, straight_granet = run()
    ckpt = str(tmp_path / "ckpts" / "epoch=16-step=17.ckpt")  # mid-schedule, between two updates
    state = torch.load(ckpt, weights_only=True)
    assert any("GraNet" in k for k in state["callbacks"])
    resumed, resumed_granet = run(ckpt=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert straight_granet.updates == resumed_granet.updates
    assert straight_granet.masks.density() == resumed_granet.masks.density()


def test_gradient_accumulation_updates_on_optimizer_steps_only(tmp_path):
    granet = GraNet(sparsity=0.8, prune_end="12st", update_every="4st")
    changes = []

    class Watch(pl.Callback):
        def __init__(self):
            self.last = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            current = [m.clone() for m in granet.masks.masks]
            if self.last is not None and any(not torch.equal(a, b) for a, b in zip(self.last, current)):
                changes.append((trainer.global_step, batch_idx % 2))
            self.last = current

    # 4 micro-batches per epoch, 2 per optimizer step: 16 optimizer steps
    trainer(tmp_path, [granet, Watch()], 16, accumulate_grad_batches=2).fit(MLP(), loader(n=64, batch=16))
    assert [step for step, _ in changes] == [4, 8, 12, 16]
    assert all(phase == 1 for _, phase in changes), "masks change only after the micro-batch that stepped"
    assert granet.updates == 4


def test_tensorboard_shows_schedule_layers_and_savings(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    granet = GraNet(sparsity=0.8, prune_end="8st", update_every="4st")
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [granet], 12, logger=logger, log_every_n_steps=1).fit(MLP(), loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for name in ("sparsity", "scheduled_density", "density", "pruned", "regrown", "inference_flops_ratio",
                 "training_flops_ratio", "layer_density/net.2"):
        assert f"efficient/granet/{name}" in scalars, name
    scheduled = [e.value for e in events.Scalars("efficient/granet/scheduled_density")]
    actual = [e.value for e in events.Scalars("efficient/granet/density")]
    assert scheduled == pytest.approx(actual, abs=1e-3) and actual[-1] == pytest.approx(0.2, abs=1e-3)
    assert "efficient/granet/layer_density" in events.Tags()["images"]
    assert any("savings" in tag for tag in events.Tags()["tensors"])


@pytest.mark.parametrize("optimizer,beta", [("sgd", 0.9), ("adamw", 0.9)])
def test_momentum_growth_regrows_where_the_dense_gradients_momentum_is_largest(tmp_path, optimizer, beta):
    """``growth="momentum"`` keeps the momentum of every position's dense gradient (the optimizer's
    own moments are zeroed at inactive positions after every step, so they would score every inactive
    position 0 and regrow only the weights just dropped: the mask stood still). Checked against an
    exponential average of the gradients kept here, and by the positions each update makes active."""
    granet = GraNet(sparsity=0.8, initial_density=0.5, prune_end="12st", update_every="4st", growth="momentum")
    mine, revived = None, []

    class Watch(pl.Callback):  # after GraNet: sees the gradients it averaged, and its masks after each update
        def on_before_optimizer_step(self, trainer, pl_module, optim):
            nonlocal mine
            grads = [p.grad.detach().float() for p in granet.masks.params]
            mine = [torch.zeros_like(g) for g in grads] if mine is None else mine
            mine = [beta * m + (1 - beta) * g for m, g in zip(mine, grads)]
            self.before = [m.clone() for m in granet.masks.masks]
            for kept, ours in zip(granet.masks.gradient_momentum, mine):
                torch.testing.assert_close(kept, ours)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % 4 == 0:
                newly = [a & ~b for a, b in zip(granet.masks.masks, self.before)]
                revived.append(sum(int(n.sum()) for n in newly))
                # the positions made active scored above every inactive one left out, layer by layer
                for n, m, score in zip(newly, granet.masks.masks, granet.masks.gradient_momentum):
                    if n.any():
                        assert score[n].abs().min() >= score[~m].abs().max()

    trainer(tmp_path, [granet, Watch()], 20).fit(MLP(optimizer), loader())
    assert len(revived) == 5 and all(count > 0 for count in revived), revived
    assert all((m != 0).any() for m in granet.masks.gradient_momentum)
