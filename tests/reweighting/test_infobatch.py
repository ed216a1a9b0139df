"""InfoBatch: the pruning rule, unbiased rescaling, annealing, real skipping of samples, LR
schedules that still end at the end, datamodules, and bad input. Resume is in
test_resume_every_technique.py, DDP in test_infobatch_ddp.py."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lit_efficient import InfoBatch
from lit_efficient.reweighting.infobatch import infobatch_plan
from tests.sparsity.sparse_helpers import MLP, loader

SCORES = torch.tensor([0.1, 5.0, 0.2, 0.3, 4.0, 0.05, 0.4, 3.0, 0.5, 0.6, 6.0, 0.7])  # mean 1.7375: 8 below


def test_plan_prunes_only_well_learned_samples_and_rescales_the_rest():
    seen = torch.ones(12, dtype=torch.bool)
    well = SCORES < SCORES.mean()
    for seed in range(20):
        keep, multipliers = infobatch_plan(SCORES, seen, 0.5, torch.Generator().manual_seed(seed))
        pruned = ~keep
        assert int(pruned.sum()) == 4 and bool((pruned & ~well).sum() == 0)  # round(0.5 * 8) well-learned only
        assert torch.equal(multipliers[well & keep], torch.full((4,), 2.0))  # 8 / (8 - 4)
        assert torch.equal(multipliers[~well], torch.ones(4))


def test_unseen_samples_are_never_pruned():
    seen = torch.tensor([True] * 6 + [False] * 6)
    keep, multipliers = infobatch_plan(SCORES, seen, 0.9, torch.Generator().manual_seed(0))
    assert keep[6:].all() and torch.equal(multipliers[6:], torch.ones(6))
    keep, _ = infobatch_plan(SCORES, torch.zeros(12, dtype=torch.bool), 0.9, torch.Generator())
    assert keep.all()


def test_rescaling_keeps_the_expected_loss_unbiased():
    torch.manual_seed(0)
    losses = torch.rand(200) ** 3 * 5  # skewed: many well-learned samples
    seen = torch.ones(200, dtype=torch.bool)
    totals = []
    for seed in range(3000):
        keep, multipliers = infobatch_plan(losses, seen, 0.7, torch.Generator().manual_seed(seed))
        totals.append(float((keep * multipliers * losses).sum()))
    totals = torch.tensor(totals, dtype=torch.float64)
    standard_error = float(totals.std()) / len(totals) ** 0.5
    assert float(totals.std()) > 0.1  # the draws really vary
    assert abs(float(totals.mean()) - float(losses.sum())) < 4 * standard_error


class CountingDataset(Dataset):
    """Counts every sample it is asked for: pruned samples must never be loaded."""

    def __init__(self, n=96):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=g)
        self.y = self.x[:, :4].argmax(1)
        self.loads = torch.zeros(n, dtype=torch.long)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.loads[i] += 1
        return self.x[i], self.y[i]


class EpochRecorder(pl.Callback):
    def __init__(self):
        self.samples, self.val_epochs, self.lrs = [], 0, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.samples.append(0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.samples[-1] += batch[0].shape[0]

    def on_validation_epoch_end(self, trainer, pl_module):
        self.val_epochs += 1

    def on_train_end(self, trainer, pl_module):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class Scheduled(MLP):
    """Linear decay to 0 over `estimated_stepping_batches`, stepped every optimizer step."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def validation_step(self, batch, batch_idx):
        return None


def fit(tmp_path, callback, epochs=8, dataset=None, accumulate=1, **kwargs):
    dataset = dataset or CountingDataset()
    recorder, model = EpochRecorder(), Scheduled()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback, recorder], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         accumulate_grad_batches=accumulate, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, DataLoader(dataset, batch_size=8, shuffle=True), loader(16, 16))
    return trainer, recorder, dataset


def test_prunes_before_the_annealing_epochs_and_skips_loading(tmp_path):
    callback = InfoBatch(prune_ratio=0.5, delta=0.75)
    trainer, recorder, dataset = fit(tmp_path, callback)
    assert recorder.samples[0] == 96  # nothing is known yet
    assert all(n < 80 for n in recorder.samples[1:6])  # about half of the ~half below the mean
    assert recorder.samples[6:] == [96, 96]  # int(0.75 * 8) = 6: the last two epochs see all data
    assert int(dataset.loads.sum()) == sum(recorder.samples)  # pruned samples were never loaded
    assert recorder.val_epochs == 8  # shorter epochs still end in validation
    row = callback.savings(trainer, trainer.lightning_module)[0]
    assert row.ratio == pytest.approx(sum(recorder.samples) / (8 * 96))
    metrics = trainer.callback_metrics
    assert float(metrics["efficient/infobatch/samples_saved"]) == 8 * 96 - sum(recorder.samples)
    assert float(metrics["efficient/infobatch/skipped_fraction"]) == 0.0  # the last epoch used all data


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_schedules_still_end_at_the_end(tmp_path, accumulate):
    trainer, recorder, _ = fit(tmp_path, InfoBatch(), accumulate=accumulate)
    full_steps = 8 * 12 // accumulate
    assert trainer.global_step < full_steps * 0.9  # real steps saved
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == full_steps
    assert recorder.lrs[-1] == 0.0


def test_without_infobatch_the_module_and_loader_are_unchanged(tmp_path):
    trainer, recorder, _ = fit(tmp_path, pl.Callback())
    assert recorder.samples == [96] * 8 and trainer.global_step == 96


class DigitsLikeData(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.dataset = CountingDataset(64)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=16, shuffle=True)


def test_works_through_a_datamodule_and_restores_it(tmp_path):
    data, callback = DigitsLikeData(), InfoBatch()
    trainer = pl.Trainer(max_epochs=4, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(MLP(), datamodule=data)
    assert int(data.dataset.loads.sum()) == callback.samples_forwarded - callback.order.numel() < 4 * 64
    assert "train_dataloader" not in data.__dict__  # the datamodule's own method again


class ScalarLoss(MLP):
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx)["loss"]


def test_delta_takes_a_time_spec_in_epochs_or_a_fraction_of_the_run():
    assert InfoBatch(delta=0.75).pruning_epochs(8) == InfoBatch(delta="6ep").pruning_epochs(8) == 6
    assert InfoBatch(delta="0.75dur").pruning_epochs(8) == 6
    assert InfoBatch(delta="20ep").pruning_epochs(8) == 8  # past the end: every epoch prunes
    assert InfoBatch(delta="6ep").delta == "6ep"  # read back as given (LightningCLI round trip)


def test_bad_input_is_refused(tmp_path):
    for kwargs, match in ((dict(prune_ratio=1.0), "prune_ratio"), (dict(prune_ratio=-0.1), "prune_ratio"),
                          (dict(delta=0.0), "delta"), (dict(delta=1.5), "delta"), (dict(delta="0ep"), "delta"),
                          (dict(delta="30st"), "delta"), (dict(shuffle="yes"), "shuffle")):
        with pytest.raises(ValueError, match=match):
            InfoBatch(**kwargs)
    with pytest.raises(ValueError, match="max_epochs"):
        pl.Trainer(max_steps=5, max_epochs=-1, callbacks=[InfoBatch()], logger=False,
                   enable_checkpointing=False, default_root_dir=tmp_path).fit(MLP(), loader(32, 8))
    with pytest.raises(ValueError, match="InfoBatch need per-sample losses"):
        pl.Trainer(max_epochs=1, callbacks=[InfoBatch()], logger=False, enable_checkpointing=False,
                   default_root_dir=tmp_path).fit(ScalarLoss(), loader(32, 8))


class NaNForSampleZero(Scheduled):
    """Sample 0's loss is NaN on every visit (the dataset index is the first feature's rank here)."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        x = batch[0]
        poisoned = (x == self.first).all(dim=1)
        losses = torch.where(poisoned, torch.full_like(out["sample_losses"], float("nan")), out["sample_losses"])
        return {**out, "loss": losses.nanmean(), "sample_losses": losses}


def test_non_finite_losses_warn_once_an_epoch_and_leave_scores_finite(tmp_path):
    dataset = CountingDataset()
    model, callback = NaNForSampleZero(), InfoBatch(prune_ratio=0.5)
    model.first = dataset.x[0]
    trainer = pl.Trainer(max_epochs=3, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="1 sample loss"):
        trainer.fit(model, DataLoader(dataset, batch_size=8, shuffle=True), loader(16, 16))
    assert torch.isfinite(callback.scores).all() and not callback.seen[0] and callback.seen[1:].all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
