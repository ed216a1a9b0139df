"""fp16 with a real GradScaler: overflow steps.

On an overflow step the gradients that ``on_before_optimizer_step`` sees are non-finite; the
scaler then skips the optimizer step (and halves its scale) while ``global_step`` advances. No
decision may be taken from such a step: a mask update, a gradient mask, a freezing check or a
basis refresh moves to the next step whose gradients are finite, and it is said once in the log.
These tests train with ``MixedPrecision("16-mixed", device="cpu", scaler=GradScaler("cpu"))`` —
CPU autocast in float16 and the real scaler — and inject an overflow (an infinite gradient entry,
after backward, before the scaler unscales) on the step where each callback decides.
"""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lit_efficient import SET, GaLore, GraNet, InfoBatch, LossReweighting, ProgressiveFreezing, RigL, SparCL
from tests.sparsity.sparse_helpers import MLP, loader
from tests.techniques import ENTRIES


def fp16_plugin():
    return MixedPrecision(precision="16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))


class Overflow(Callback):
    """Makes the steps in ``at`` (``global_step`` before them) overflow: one gradient entry of
    ``param`` (a name; default the head, which nothing freezes) becomes inf after backward, as an
    fp16 overflow would. Records, after every
    optimizer step, whether the weights moved and ``probe()``'s value."""

    def __init__(self, at, param="net.6.weight", where=(0, 0), probe=None):
        self.at, self.param, self.where, self.probe = set(at), param, where, probe
        self.moved, self.seen, self._before = {}, {}, None

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.at:
            pl_module.get_parameter(self.param).grad[self.where] = math.inf

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the step just taken, as counted in `at`
        after = dict(pl_module.named_parameters())
        self.moved[step] = any(not torch.equal(v, after[n]) for n, v in self._before.items())
        if self.probe is not None:
            self.seen[step] = self.probe()


def fit(callbacks, overflow, max_epochs=20, data=None, model=None, **kwargs):
    pl.seed_everything(0)
    model = model or MLP()
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[*callbacks, overflow], plugins=[fp16_plugin()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, **kwargs)
    trainer.fit(model, data or loader(n=16, batch=16))
    return model, trainer


def finite(value):
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_every_callback_trains_through_overflow_steps_and_keeps_finite_state(name):
    callbacks = ENTRIES[name]()
    overflow = Overflow(at=[2, 5, 8])  # the registry's 3-step schedules decide after steps 3, 6, 9
    model, trainer = fit(callbacks, overflow)
    assert trainer.global_step == 20
    assert not any(overflow.moved[s] for s in (2, 5, 8)), "a weight moved on a step the scaler skipped"
    assert trainer.precision_plugin.scaler.get_scale() < 65536.0  # the scaler did see the overflows
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # and the buffers callbacks keep beside the weights (GraNet's momentum of the dense gradients)
    assert all(torch.isfinite(b).all() for b in model.buffers() if b.is_floating_point())
    assert finite(trainer.optimizers[0].state_dict()["state"])
    for callback in callbacks:
        assert finite(callback.state_dict()), type(callback).__name__


def said_once(record, words):
    return sum(words in str(w.message) for w in record) == 1


@pytest.mark.parametrize("cls", [RigL, SET, GraNet])
def test_a_mask_update_moves_to_the_next_finite_step(cls):
    kwargs = dict(prune_end="14st") if cls is GraNet else dict(stop=0.9)
    callback = cls(sparsity=0.8, update_every="3st", **kwargs)
    # the update after step 3 (global_step 2 before it) overflows; the injected entry is one the mask
    # has closed, and an update reading that gradient would grow it first
    overflow = Overflow(at=[2], param="net.2.weight", probe=lambda: callback.updates)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model, trainer = fit([callback], overflow)
    assert overflow.seen[2] == 0 and overflow.seen[3] == 1, overflow.seen  # after step 4, not 3
    assert overflow.seen[5] == 2  # the schedule goes on as before
    assert said_once(record, "not finite")
    masks = callback.masks
    assert abs(masks.sparsity() - 0.8) < 0.01 and masks.is_applied()


def test_an_update_put_off_past_the_end_of_the_updates_is_dropped():
    callback = RigL(sparsity=0.8, update_every="3st", stop="4st")  # one update, after step 3
    overflow = Overflow(at=[2], probe=lambda: callback.updates)
    fit([callback], overflow, max_epochs=8)
    assert callback.updates == 0 and not callback.update_deferred


def test_rigl_never_grows_where_an_overflowed_gradient_points():
    """The injected inf sits at a closed position of a targeted layer: an update that read that
    gradient would grow exactly there first."""
    callback = RigL(sparsity=0.9, update_every="3st", stop=0.9, distribution="uniform")
    overflow = Overflow(at=[2], param="net.2.weight", probe=lambda: callback.masks.masks[1].clone())

    class Aim(Callback):  # the step before the overflow: aim at a closed entry of net.2
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                overflow.where = tuple(int(i) for i in (~callback.masks.masks[1]).nonzero()[0])

    fit([callback, Aim()], overflow, max_epochs=8)
    assert callback.updates >= 1
    before, after = overflow.seen[2], overflow.seen[3]  # the update ran after step 4 (index 3)
    assert not before[overflow.where] and not after[overflow.where]


def test_adaptive_freezing_does_not_decide_from_an_overflow_step():
    """The measured failure: a NaN threshold froze every block at once, irreversibly."""
    callback = ProgressiveFreezing(schedule="adaptive", freeze_start="2st", check_every="2st", percentile=50,
                                   blocks=["net.0", "net.2", "net.4"])
    overflow = Overflow(at=[3, 5, 7], param="net.4.weight", probe=lambda: callback.frozen)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit([callback], overflow, max_epochs=10)
    assert all(math.isfinite(n) for n in callback.previous_norms)
    assert overflow.seen[3] < 3  # the overflowed check froze nothing from a NaN
    assert said_once(record, "not finite")


def test_freezeout_lr_annealing_blends_nothing_into_a_skipped_step():
    callback = ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear", lr_annealing=True,
                                   blocks=["net.0", "net.2", "net.4"])
    overflow = Overflow(at=[4, 5])
    model, _ = fit([callback], overflow)
    assert not overflow.moved[4] and not overflow.moved[5] and overflow.moved[6]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_galore_refreshes_on_the_next_finite_step():
    callback = GaLore(rank=8, update_proj_gap=3)
    refreshes = lambda: sum(o.refreshes for o in callback.optimizers)  # noqa: E731
    overflow = Overflow(at=[3], probe=refreshes)  # its 4th step would refresh (state step 3)
    fit([callback], overflow, max_epochs=8)
    per_refresh = overflow.seen[0]  # every projected matrix refreshes at its first step
    assert overflow.seen[3] == overflow.seen[2] == per_refresh  # skipped by the scaler: no basis from inf
    assert overflow.seen[4] == 2 * per_refresh  # the next real step is the refresh
    for optimizer in callback.optimizers:
        assert finite(optimizer.state_dict()["state"])


def test_layerwise_galore_is_refused_with_a_grad_scaler(tmp_path):
    trainer = pl.Trainer(max_steps=2, callbacks=[GaLore(rank=8, layerwise=True)], plugins=[fp16_plugin()],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="GradScaler"):
        trainer.fit(MLP(), loader())


def test_sparcl_defers_its_mask_update_and_gradient_mask_refresh():
    from examples.vision.continual import ContinualClassifier, SplitDigits

    sparcl = SparCL(sparsity=0.75, mask_update_every=0.5, gradient_mask_every=4)
    probe = lambda: (sparcl.updates, sparcl.grad_mask_step)  # noqa: E731
    # 2 tasks of 2 epochs, 3 batches each: the TDM update after the last batch of epoch 0 (step 2)
    # and the DGM refresh at step 4 (first of epoch 1) both overflow
    overflow = Overflow(at=[2, 3], param="model.head.weight", probe=probe)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        fit([sparcl], overflow, max_epochs=4, model=ContinualClassifier(method="derpp", buffer_size=50, width=8),
            data=None if False else SplitDigits(num_tasks=2, epochs_per_task=2, batch_size=128), limit_val_batches=0)
    assert overflow.seen[2][0] == 0 and overflow.seen[4][0] == 1, overflow.seen  # TDM after step 5, not 3
    assert overflow.seen[3][1] != 3  # no gradient mask computed from the overflowed step 4
    assert all(bool((g.sum() > 0)) for g in sparcl.grad_masks)


def test_loss_callbacks_leave_out_a_non_finite_sample_loss():
    """A sample whose loss overflows in the forward takes no part: InfoBatch keeps its previous
    score, LossReweighting gives it weight 0 and weights the rest among themselves."""

    class InfLoss(MLP):  # one-batch epochs: at step 3 (epoch 3) sample 0's loss is inf
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            losses = out["sample_losses"]
            if self.trainer.global_step == 3:
                losses = torch.cat([losses[:1] * math.inf, losses[1:]])
            return {"loss": losses.mean(), "sample_losses": losses}

    infobatch = InfoBatch(prune_ratio=0.0, shuffle=False)  # every sample visited every epoch
    overflow = Overflow(at=[], probe=lambda: infobatch.scores.clone())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit([infobatch], overflow, max_epochs=6, model=InfLoss())
    # seen[k]: the scores after epoch k - 1 (they change at the end of an epoch, after its last batch)
    before, during, after = overflow.seen[3], overflow.seen[4], overflow.seen[5]
    assert during[0] == before[0] and bool((during[1:] != before[1:]).all())  # kept its epoch-2 score
    assert after[0] != during[0] and finite(infobatch.state_dict())
    assert any("NaN/inf" in str(w.message) for w in record)

    reweighting = LossReweighting(warmup="1st")
    seen = {}

    class Weights(Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            if reweighting._last_weights is not None:  # after the warm-up
                seen[trainer.global_step] = reweighting._last_weights.clone()

    model, _ = fit([reweighting, Weights()], Overflow(at=[]), max_epochs=6, model=InfLoss())
    weights = seen[3]
    assert weights[0] == 0 and torch.isfinite(weights).all() and abs(float(weights.sum()) - 1) < 1e-6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_granets_gradient_momentum_skips_the_steps_the_scaler_skips():
    """The momentum of the dense gradients (``growth="momentum"``) moves on every step but one
    the scaler skips, even where the inf is in another layer (the head); the skip is decided on the
    device (``torch.where`` on a device flag), not by reading the flag back."""
    callback = GraNet(sparsity=0.8, prune_end="14st", update_every="3st", growth="momentum")
    overflow = Overflow(at=[4, 7], probe=lambda: [m.clone() for m in callback.masks.gradient_momentum])
    fit([callback], overflow)
    for step in range(1, 20):
        same = all(torch.equal(a, b) for a, b in zip(overflow.seen[step], overflow.seen[step - 1]))
        assert same == (step in (4, 7)), step
