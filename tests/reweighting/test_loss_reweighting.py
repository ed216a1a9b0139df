"""LossReweighting: the weights of each strategy by hand, the per-sample loss contract, gradient
accumulation, non-finite losses, diffusion timestep buckets, and DDP (in test_reweighting_ddp.py)."""

import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lit_efficient import LossReweighting
from lit_efficient.reweighting.loss_reweighting import normalise_losses, reweight
from tests.sparsity.sparse_helpers import MLP, loader, trainer

LOSSES = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])  # normalised: h = -1, -0.5, 0, 0.5, 1


def softmax_by_hand(f, r=1.0):
    e = [math.exp(v / r) for v in f]
    return torch.tensor([v / sum(e) for v in e])


@pytest.mark.parametrize("strategy,f", [
    ("linupper", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("quadratic", [0.0, 0.75, 1.0, 0.75, 0.0]),
    ("extremes", [1.0, 0.5, 0.0, 0.5, 1.0]),
    ("uniform", [0.0] * 5),
])
@pytest.mark.parametrize("r", [1.0, 0.4])
def test_weights_match_hand_computed_values(strategy, f, r):
    weights = reweight(LOSSES, strategy, r)
    torch.testing.assert_close(weights, softmax_by_hand(f, r))
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)


def test_normalisation_by_hand_and_per_group():
    torch.testing.assert_close(normalise_losses(LOSSES), torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64))
    groups = torch.tensor([0, 0, 1, 1, 1])  # {0, 1} -> -1, 1 ; {2, 3, 4} -> -1, 0, 1
    torch.testing.assert_close(normalise_losses(LOSSES, groups),
                               torch.tensor([-1.0, 1.0, -1.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.equal(normalise_losses(torch.full((3,), 2.5)), torch.zeros(3, dtype=torch.float64))  # all equal


def test_softmax_is_stable_with_extreme_losses_and_temperatures():
    losses = torch.tensor([3e38, -3e38, 0.0, 1e-30, 5.0])
    for r in (1e-4, 1.0, 1e6):
        weights = reweight(losses, "linupper", r)
        assert torch.isfinite(weights).all() and float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
    # the largest/smallest ratio is bounded by e^(1/r)
    for r in (0.5, 1.0, 2.0):
        weights = reweight(torch.randn(100) * 10, "linupper", r)
        assert float(weights.max() / weights.min()) <= math.exp(1 / r) * (1 + 1e-5)


def test_uniform_and_infinite_temperature_are_the_plain_mean():
    losses = torch.rand(7) * 3
    for weights in (reweight(losses, "uniform", 1.0), reweight(losses, "linupper", math.inf)):
        assert torch.equal(weights, torch.full((7,), 1 / 7))


def test_non_finite_losses_get_zero_weight():
    weights = reweight(torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0]), "linupper", 1.0)
    assert torch.isfinite(weights).all() and weights[1] == 0 and weights[3] == 0
    torch.testing.assert_close(weights[[0, 2, 4]], softmax_by_hand([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="cubic"), "strategy"), (dict(temperature=0), "temperature"), (dict(temperature=-1.0), "temperature"),
    (dict(warmup=1.5), "warmup"), (dict(timestep_buckets=-1), "timestep_buckets"),
    (dict(timestep_buckets=10, num_timesteps=5), "timestep_buckets"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossReweighting(**kwargs)


class Recorder(pl.Callback):
    """Keeps each micro-batch's returned dict and the gradients seen at each optimizer step."""

    def __init__(self):
        self.outputs, self.grads = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items() if isinstance(v, torch.Tensor)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append([p.grad.clone() for p in pl_module.parameters()])


@pytest.mark.parametrize("callback", [LossReweighting(strategy="uniform", warmup=0),
                                      LossReweighting(temperature=math.inf, warmup=0),
                                      LossReweighting(warmup="5st")])
def test_plain_mean_exactly_when_uniform_or_warming_up(tmp_path, callback):
    recorder = Recorder()
    trainer(tmp_path, [callback, recorder], 4).fit(MLP(), loader(64, 16))
    assert len(recorder.outputs) == 4
    for out in recorder.outputs:  # Lightning hands back the loss it optimised
        assert torch.equal(out["loss"], out["sample_losses"].mean())


def test_weighted_loss_is_the_reweighted_sum_and_module_is_restored(tmp_path):
    recorder, model = Recorder(), MLP()
    trainer(tmp_path, [LossReweighting(warmup=0), recorder], 4).fit(model, loader(64, 16))
    for out in recorder.outputs:
        expected = (reweight(out["sample_losses"]) * out["sample_losses"]).sum()
        torch.testing.assert_close(out["loss"], expected)
        assert not torch.equal(out["loss"], out["sample_losses"].mean())
    assert "training_step" not in model.__dict__  # unwrapped at teardown: the module trains alone again


class WithRegulariser(MLP):
    """A loss term that belongs to no sample (like DER++'s replay), declared as ``extra_loss``."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        extra = 0.1 * sum(p.pow(2).sum() for p in self.parameters())
        return {**out, "loss": out["loss"] + extra, "extra_loss": extra}


def test_extra_loss_is_added_back_unweighted(tmp_path):
    recorder = Recorder()
    trainer(tmp_path, [LossReweighting(warmup=0), recorder], 3).fit(WithRegulariser(), loader(64, 16))
    for out in recorder.outputs:
        weighted = (reweight(out["sample_losses"]) * out["sample_losses"]).sum()
        torch.testing.assert_close(out["loss"], weighted + out["extra_loss"])
        assert out["extra_loss"] > 0


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = (self.net(x).squeeze(1) - y) ** 2
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: grads are comparable by hand


def regression_loader(n=32, batch=8):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1) * 2 + torch.randn(n, generator=g)),
                                       batch_size=batch)


def test_gradient_accumulation_weights_each_micro_batch_on_its_own(tmp_path):
    recorder, model = Recorder(), Linear()
    trainer(tmp_path, [LossReweighting(warmup=0, temperature=0.5), recorder], 2,
            accumulate_grad_batches=2).fit(model, regression_loader())
    assert len(recorder.grads) == 2
    reference = Linear()
    for step, grads in enumerate(recorder.grads):
        reference.zero_grad()
        for micro in range(2):
            x, y = _batch(step * 2 + micro)
            losses = (reference.net(x).squeeze(1) - y) ** 2
            ((reweight(losses.detach(), "linupper", 0.5) * losses).sum() / 2).backward()
        for got, want in zip(grads, [p.grad for p in reference.parameters()]):
            torch.testing.assert_close(got, want)


def _batch(index, batch=8):
    x, y = regression_loader().dataset.tensors
    return x[index * batch : (index + 1) * batch], y[index * batch : (index + 1) * batch]


def test_loss_scale_is_preserved():
    """Equal losses: any strategy gives exactly the plain mean; spread losses stay within [min, max]."""
    same = torch.full((16,), 1.7)
    for strategy in ("linupper", "quadratic", "extremes"):
        assert float((reweight(same, strategy, 0.3) * same).sum()) == pytest.approx(1.7, rel=1e-6)
        spread = torch.rand(16) * 4
        value = float((reweight(spread, strategy, 0.3) * spread).sum())
        assert float(spread.min()) <= value <= float(spread.max())


class NaNOnStepTwo(MLP):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            poison = torch.zeros_like(out["sample_losses"])
            poison[0], poison[1] = float("nan"), float("inf")
            out["sample_losses"] = out["sample_losses"] + poison
        return out


def test_non_finite_sample_losses_warn_and_training_continues(tmp_path):
    recorder, model = Recorder(), NaNOnStepTwo()
    with pytest.warns(UserWarning, match="2 sample loss"):
        trainer(tmp_path, [LossReweighting(warmup=0), recorder], 5).fit(model, loader(80, 16))
    assert len(recorder.outputs) == 5 and all(torch.isfinite(o["loss"]) for o in recorder.outputs)
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ScalarLoss(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def test_module_without_sample_losses_gets_the_contract_error(tmp_path):
    with pytest.raises(ValueError, match=r"LossReweighting need per-sample losses.*sample_losses"):
        trainer(tmp_path, [LossReweighting(warmup=0)], 2).fit(ScalarLoss(), loader(64, 16))


class TimestepModel(MLP):
    """Pretends to be a diffusion model: timesteps 0..999, and losses that mostly reflect them."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        t = torch.arange(out["sample_losses"].numel()) * 997 % 1000
        return {**out, "timesteps": t}


def test_timestep_buckets_normalise_within_each_bucket(tmp_path):
    recorder = Recorder()
    trainer(tmp_path, [LossReweighting(warmup=0, timestep_buckets=4), recorder], 2).fit(TimestepModel(), loader(64, 16))
    for out in recorder.outputs:
        groups = out["timesteps"] * 4 // 1000
        expected = (reweight(out["sample_losses"], "linupper", 1.0, groups) * out["sample_losses"]).sum()
        torch.testing.assert_close(out["loss"], expected)
    with pytest.raises(ValueError, match="timestep_key"):
        trainer(tmp_path, [LossReweighting(warmup=0, timestep_buckets=4)], 2).fit(MLP(), loader(64, 16))


def test_tensorboard_shows_weights_and_statistics(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [LossReweighting(warmup=0, temperature=0.5)], 6, logger=logger, log_every_n_steps=2)
    t.fit(MLP(), loader(96, 16))
    metrics = t.callback_metrics
    ess = float(metrics["efficient/loss_reweighting/effective_sample_size"])
    assert 0.3 < ess < 1.0
    assert 1.0 < float(metrics["efficient/loss_reweighting/max_min_weight_ratio"]) <= math.exp(2) * 1.0001
    assert "efficient/loss_reweighting/loss_weighted" in metrics
    assert "efficient/loss_reweighting/loss_unweighted" in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0})
    events.Reload()
    assert "efficient/loss_reweighting/weights" in events.Tags()["histograms"]


def test_checkpoint_state_loads_weights_only(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)
    trainer(tmp_path, [LossReweighting(warmup=0), saver], 3, enable_checkpointing=True).fit(MLP(), loader(64, 16))
    state = torch.load(os.path.join(tmp_path, "c", "last.ckpt"), weights_only=True)
    assert state["callbacks"][next(k for k in state["callbacks"] if "LossReweighting" in k)]["weighted_steps"] == 3
