"""What a researcher sees of InfoBatch and LossReweighting in TensorBoard: the figures on the steps
that decide something (and on no other), the histograms, and the progress-bar entries."""

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger

from figure_events import events_of, figure_steps, histogram_steps, keep_figure
from lit_efficient import InfoBatch, LossReweighting
from tests.sparsity.sparse_helpers import MLP, loader


class Recorder(pl.Callback):
    """The global step at each epoch's start, and the progress bar at each epoch's end."""

    def __init__(self):
        self.starts, self.bars = [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.starts.append(trainer.global_step)

    def on_train_epoch_end(self, trainer, pl_module):
        self.bars.append(dict(trainer.progress_bar_metrics))


def fit(tmp_path, callback, epochs, n, batch=8, log_every_n_steps=50, with_logger=True):
    logger = TensorBoardLogger(tmp_path, name="tb") if with_logger else False
    recorder = Recorder()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback, recorder], logger=logger,
                         log_every_n_steps=log_every_n_steps, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(MLP(), loader(n=n, batch=batch))
    return trainer, recorder, (events_of(logger.log_dir) if with_logger else None)


def test_infobatch_draws_each_pruning_decision_and_shows_the_skipped_share(tmp_path):
    callback = InfoBatch(prune_ratio=0.5, delta=0.75)  # 5 epochs: epochs 1-2 prune, 0 (unscored) and 3-4 do not
    trainer, recorder, events = fit(tmp_path, callback, epochs=5, n=96)
    decisions = recorder.starts[1:3]
    assert recorder.starts[1] == 12 and decisions[1] < 24  # the pruned epoch is shorter
    assert figure_steps(events, "efficient/infobatch/data") == decisions
    assert histogram_steps(events, "efficient/infobatch/scores") == decisions
    keep_figure(events, "efficient/infobatch/data", "infobatch_data")
    # the history the figure stacks, one row per epoch begun: pruned only in epochs 1 and 2
    assert [epoch for epoch, _ in callback.removed] == [0, 1, 2, 3, 4]
    removed = [fraction for _, fraction in callback.removed]
    assert removed[0] == removed[3] == removed[4] == 0.0 and 0.1 < removed[1] < 0.5 and 0.1 < removed[2] < 0.5
    assert [bar["skipped%"] for bar in recorder.bars] == pytest.approx([round(100 * r, 1) for r in removed], abs=1e-4)
    # resumed, the history comes back (and an older checkpoint without it loads as empty)
    again = InfoBatch(prune_ratio=0.5, delta=0.75)
    again.load_state_dict(callback.state_dict())
    assert again.removed == callback.removed
    state = callback.state_dict()
    del state["removed"]
    again.load_state_dict(state)
    assert again.removed == []


def test_infobatch_progress_entry_can_be_switched_off(tmp_path):
    trainer, recorder, _ = fit(tmp_path, InfoBatch(delta=0.75, progress_bar=False), epochs=3, n=48, with_logger=False)
    assert "skipped%" not in trainer.progress_bar_metrics and all("skipped%" not in bar for bar in recorder.bars)
    with pytest.raises(ValueError, match="progress_bar"):
        InfoBatch(progress_bar="yes")


def test_loss_reweighting_draws_once_an_epoch_on_a_logging_step(tmp_path):
    callback = LossReweighting(warmup=0, temperature=0.4)
    trainer, recorder, events = fit(tmp_path, callback, epochs=3, n=256, batch=32, log_every_n_steps=3)
    # 8 steps an epoch; logs at steps 3, 6, ..., 24: the first of each epoch is 3, 9 and 18
    assert figure_steps(events, "efficient/loss_reweighting/weights") == [3, 9, 18]
    assert histogram_steps(events, "efficient/loss_reweighting/weights") == [3, 6, 9, 12, 15, 18, 21, 24]
    keep_figure(events, "efficient/loss_reweighting/weights", "loss_reweighting_weights")
    ess = trainer.progress_bar_metrics["ess%"]
    assert 0 < ess <= 100
    logged = float(trainer.callback_metrics["efficient/loss_reweighting/effective_sample_size"])
    assert ess == pytest.approx(100 * logged, abs=0.051)  # the last logging step's, rounded


def test_loss_reweighting_progress_entry_can_be_switched_off_and_waits_for_the_warmup(tmp_path):
    trainer, _, _ = fit(tmp_path, LossReweighting(warmup=0, progress_bar=False), epochs=1, n=64,
                        log_every_n_steps=2, with_logger=False)
    assert "ess%" not in trainer.progress_bar_metrics
    trainer, _, _ = fit(tmp_path, LossReweighting(warmup=1.0), epochs=1, n=64, log_every_n_steps=2,
                        with_logger=False)  # never active: nothing to show
    assert "ess%" not in trainer.progress_bar_metrics
    with pytest.raises(ValueError, match="progress_bar"):
        LossReweighting(progress_bar=1)
