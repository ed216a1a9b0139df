"""Our callbacks together: refused where they cannot share, correct where they can, and the same
result whatever the order of ``trainer.callbacks``."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_efficient import (
    GaLore,
    GraNet,
    InfoBatch,
    LossReweighting,
    NMSparsity,
    ProgressiveFreezing,
    RigL,
    SparCL,
)
from lit_efficient.core.composition import check_composition
from lit_efficient.sparsity.masks import MASK_BUFFER
from tests.sparsity.sparse_helpers import MLP, loader


def fit(tmp_path, callbacks, model=None, **kwargs):
    pl.seed_everything(0)
    model = model or MLP()
    kwargs.setdefault("max_steps", 12)
    trainer = pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, loader(n=64, batch=16))
    return model, trainer


# -- refusals --------------------------------------------------------------------------------------


def test_two_sparsity_callbacks_on_one_weight_are_refused_in_setup(tmp_path):
    with pytest.raises(ValueError, match=r"GraNet and RigL both need the weights of net\.0.*disjoint"):
        fit(tmp_path, [GraNet(sparsity=0.5), RigL(sparsity=0.5)])


def test_sparsity_callbacks_on_disjoint_layers_work_together(tmp_path):
    rigl, nm = RigL(sparsity=0.75, include=["net.2"], update_every="4st"), NMSparsity(include=["net.4"])
    model, _ = fit(tmp_path, [rigl, nm])
    assert abs(rigl.masks.sparsity() - 0.75) < 1e-3
    groups = model.net[4].weight.detach().reshape(-1, 4)
    assert bool(((groups != 0).sum(dim=1) <= 2).all())  # N:M written into the weights at fit end


def test_two_instances_of_a_stateful_callback_are_refused_by_lightning(tmp_path):
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `LossReweighting`"):
        fit(tmp_path, [LossReweighting(), LossReweighting(strategy="quadratic")])


def test_two_nm_callbacks_on_disjoint_layers_work_and_overlapping_ones_are_refused(tmp_path):
    two_four, one_four = NMSparsity(include=["net.2"]), NMSparsity(n=1, include=["net.4"])
    model, _ = fit(tmp_path, [two_four, one_four])
    assert int((model.net[4].weight.reshape(-1, 4) != 0).sum(dim=1).max()) == 1
    with pytest.raises(ValueError, match=r"NMSparsity and NMSparsity both need the weights of net\.2"):
        fit(tmp_path, [NMSparsity(include=["net.2"]), NMSparsity(n=1)])


def test_two_sample_order_planners_are_refused():
    with pytest.raises(ValueError, match="InfoBatch and SparCL both need the order of the training samples"):
        check_composition([InfoBatch(), SparCL()])
    check_composition([InfoBatch(), SparCL(ddr=False)])  # SparCL without data removal leaves the loader alone


# -- combinations that must work -----------------------------------------------------------------


def test_galore_with_rigl_keeps_pruned_weights_zero_and_restarts_regrown_layers(tmp_path):
    galore, rigl = GaLore(rank=4, update_proj_gap=4), RigL(sparsity=0.8, update_every="3st", stop=1.0)

    class Probe(Callback):  # after RigL in the list: sees each step's masks applied and updated
        zero_after_every_step = True
        restarted: list = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            for p, m in zip(rigl.masks.params, rigl.masks.masks):
                self.zero_after_every_step &= bool((p[~m] == 0).all())
            if trainer.global_step == 6:  # a mask update step: regrown layers restart their projected moments
                state = trainer.optimizers[0].state
                self.restarted = ["step" not in state[p] and "exp_avg" not in state[p] for p in rigl.masks.params]

    probe = Probe()
    model, trainer = fit(tmp_path, [galore, rigl, probe], max_steps=9)
    assert probe.zero_after_every_step
    projected = {id(p) for p, _ in trainer.optimizers[0].projected_params()}
    assert all(id(p) in projected for p in rigl.masks.params), "RigL's layers should be GaLore-projected here"
    assert probe.restarted and all(probe.restarted)
    assert rigl.masks.is_applied()


def test_freezing_with_rigl_leaves_frozen_layers_masks_and_weights_alone(tmp_path):
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
    rigl = RigL(sparsity=0.8, update_every="2st", stop=1.0)

    class Probe(Callback):
        snapshot = None

        def on_train_batch_end(self, trainer, pl_module, *args):
            layer = pl_module.net[2]
            if self.snapshot is None and not layer.weight.requires_grad:
                self.snapshot = (layer.weight.detach().clone(), getattr(layer, MASK_BUFFER).clone(),
                                 trainer.global_step)

    probe = Probe()
    model, _ = fit(tmp_path, [freezing, rigl, probe], max_steps=16)
    assert probe.snapshot is not None and probe.snapshot[2] < 14, "net.2 should freeze early enough to be tested"
    weight, mask, _ = probe.snapshot
    assert torch.equal(model.net[2].weight.detach(), weight)
    assert torch.equal(getattr(model.net[2], MASK_BUFFER), mask)
    assert rigl.updates >= 7  # updates went on for the trainable layer (net.4)


def test_freezing_with_granet_prunes_the_trainable_layers_to_the_target(tmp_path):
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
    granet = GraNet(sparsity=0.8, prune_end="12st", update_every="2st", include=["net.2", "net.4"])
    fit(tmp_path, [freezing, granet], max_steps=16)
    assert abs(granet.masks.sparsity() - 0.8) < 1e-3  # net.2 froze dense-ish; net.4 took the rest
    assert granet.masks.layer_densities()[0] > granet.masks.layer_densities()[1]


def test_freezing_with_galore_removes_frozen_matrices_and_their_flags(tmp_path):
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
    model, trainer = fit(tmp_path, [GaLore(rank=4, update_proj_gap=4), freezing], max_steps=16)
    optimizer = trainer.optimizers[0]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p not in optimizer.state for p in frozen)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in frozen}
    for group in optimizer.param_groups:
        assert len(group.get("projected", group["params"])) == len(group["params"])


# -- order does not matter -----------------------------------------------------------------------


def everything():
    return [
        ProgressiveFreezing(schedule="freezeout", t0=0.4, warp="linear", lr_annealing=True),
        RigL(sparsity=0.7, update_every="2st", stop=1.0, include=["net.2", "net.4"]),
        GaLore(rank=4, update_proj_gap=3, exclude=["net.2", "net.4"]),
        LossReweighting(warmup="2st"),
        InfoBatch(prune_ratio=0.5, delta=0.8),
    ]


def test_the_result_does_not_depend_on_the_order_of_the_callbacks(tmp_path):
    forward, _ = fit(tmp_path, everything(), max_steps=-1, max_epochs=6)
    backward, _ = fit(tmp_path, everything()[::-1], max_steps=-1, max_epochs=6)
    for (name, a), b in zip(forward.state_dict().items(), backward.state_dict().values()):
        assert torch.equal(a, b), name
    assert not forward.net[0].weight.requires_grad  # freezing really happened


def test_schedules_run_on_the_full_data_clock_when_infobatch_shortens_epochs(tmp_path):
    infobatch = InfoBatch(prune_ratio=0.5, delta=0.8)
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear")
    rigl = RigL(sparsity=0.8, update_every="2st", stop=0.5, include=["net.2", "net.4"])

    class Probe(Callback):
        updates: list = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            if rigl.updates > len(self.updates):
                self.updates.append(rigl.position(trainer.global_step))

    model, trainer = fit(tmp_path, [infobatch, freezing, rigl, Probe()], max_steps=-1, max_epochs=20)
    full = 20 * 4  # full-data optimizer steps: 20 epochs of 64 samples in batches of 16
    assert trainer.global_step < full - 10  # pruned epochs were shorter ...
    assert rigl.position(trainer.global_step) == full  # ... and the clock still ends at the full run
    assert freezing.frozen == len(freezing.blocks) == 3  # the last freeze time (0.77 of the epochs) came
    assert Probe.updates and max(Probe.updates) < full // 2  # RigL stopped at half of the epochs
    assert max(Probe.updates) >= full // 2 - 4  # and not long before
