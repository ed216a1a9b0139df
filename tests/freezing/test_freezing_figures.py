"""The freezing timeline figure (planned vs actual freeze steps above the throughput) and the
``frozen/<blocks>`` progress-bar entry, read back from TensorBoard's events."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from figure_events import events_of, figure_steps, keep_figure
from lit_efficient import AutoFreeze, FreezeOut, ProgressiveFreezing
from lit_efficient.freezing.base import THROUGHPUT_KEY
from tests.freezing.test_progressive import ViTModule, image_loader, make_trainer

TAG = "efficient/freezing/timeline"
STEPS, PER_EPOCH = 14, 4  # 32 rows in batches of 8: epochs end at steps 4, 8, 12 and (cut short) 14


class EpochEnds(pl.Callback):
    """The optimizer step at the end of each training epoch."""

    def __init__(self):
        self.steps = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)


def fit(tmp_path, freezing, steps=STEPS, log_every_n_steps=2):
    logger = TensorBoardLogger(tmp_path, name="tb")
    ends = EpochEnds()
    trainer = make_trainer(tmp_path, [freezing, ends], steps, logger=logger, log_every_n_steps=log_every_n_steps)
    trainer.fit(ViTModule(), image_loader())
    return trainer, events_of(logger.log_dir), ends.steps


def test_timeline_is_drawn_on_freeze_positions_and_epoch_ends_only(tmp_path):
    freezing = FreezeOut(t0=0.3, warp="linear")  # freezes at 30%, 47.5%, 65% and 82.5% of 14 steps
    trainer, events, epoch_ends = fit(tmp_path, freezing)
    assert epoch_ends == [4, 8, 12, 14]
    assert freezing.freeze_positions == freezing.planned_freeze_positions() == [5, 7, 10, 12]
    # each once: step 12 is both a freeze and an epoch end; the 14 steps drew 7 figures, not 14
    drawn = figure_steps(events, TAG)
    assert drawn == sorted(set(freezing.freeze_positions) | set(epoch_ends)) == [4, 5, 7, 8, 10, 12, 14]
    image = events.Images(TAG)[-1]
    assert image.width >= 800 and image.height >= 600
    keep_figure(events, TAG, "freezing_timeline_14_steps")  # the card shows the README job's
    assert trainer.progress_bar_metrics["frozen/4"] == 4.0
    # a point at every logging step and every freeze (the drawing itself is left out of the windows)
    assert {s for s, _ in freezing.throughput_history} == set(range(2, STEPS + 1, 2)) | set(freezing.freeze_positions)
    assert all(rate > 0 for _, rate in freezing.throughput_history)


def test_progress_bar_false_leaves_no_entry(tmp_path):
    freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5, progress_bar=False)
    assert freezing.progress_bar is False
    trainer, events, _ = fit(tmp_path, freezing, steps=8)
    assert freezing.frozen == 2
    assert not any(key.startswith("frozen/") for key in trainer.progress_bar_metrics)
    assert figure_steps(events, TAG)  # the figure does not depend on the progress bar


def test_progress_bar_is_checked():
    with pytest.raises(ValueError, match="`progress_bar`"):
        FreezeOut(progress_bar="yes")


def test_autofreeze_draws_the_actual_steps_without_a_plan(tmp_path):
    freezing = AutoFreeze(freeze_start="2st", check_every="2st", percentile=75, freeze_level=0.75)
    trainer, events, epoch_ends = fit(tmp_path, freezing, steps=12, log_every_n_steps=50)
    assert freezing.planned_freeze_positions() is None
    assert 1 <= freezing.frozen <= 3 and len(freezing.freeze_positions) == freezing.frozen
    assert figure_steps(events, TAG) == sorted(set(freezing.freeze_positions) | set(epoch_ends))
    assert trainer.progress_bar_metrics["frozen/4"] == float(freezing.frozen)


def test_a_resumed_run_draws_the_whole_history(tmp_path):
    straight = FreezeOut(t0=0.3, warp="linear")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=2, save_top_k=-1, save_on_train_epoch_end=True)
    make_trainer(tmp_path, [straight, saver], STEPS, log_every_n_steps=2,
                 enable_checkpointing=True).fit(ViTModule(), image_loader())
    checkpoint = torch.load(tmp_path / "ckpts" / "epoch=1-step=8.ckpt", weights_only=True)
    saved = [tuple(point) for point in checkpoint[THROUGHPUT_KEY]]
    assert [s for s, _ in saved] == [2, 4, 6, 8]  # logging steps (no figure drawn: no TensorBoard)

    resumed = FreezeOut(t0=0.3, warp="linear")
    logger, ends = TensorBoardLogger(tmp_path, name="tb"), EpochEnds()
    make_trainer(tmp_path, [resumed, ends], STEPS, logger=logger, log_every_n_steps=2).fit(
        ViTModule(), image_loader(), ckpt_path=str(tmp_path / "ckpts" / "epoch=1-step=8.ckpt"))
    assert resumed.freeze_positions == straight.freeze_positions == [5, 7, 10, 12]
    assert list(resumed.throughput_history)[: len(saved)] == saved  # the measurements before the resume
    assert resumed.state_dict() == straight.state_dict()  # wall-clock stays out of the state
    # against the resumed run's own epoch ends: Lightning replays an epoch-end checkpoint's last batch as an
    # epoch of its own, so they need not be the uninterrupted run's
    assert figure_steps(events_of(logger.log_dir), TAG) == sorted({10, 12} | set(ends.steps))


def test_a_checkpoint_from_before_the_timeline_loads():
    freezing = FreezeOut(t0=0.3, warp="linear")
    freezing.load_state_dict({"frozen": 2, "frozen_param_steps": 1.0, "counted_steps": 8, "last_step": 8})
    assert freezing.freeze_positions == [None, None]  # froze at steps not recorded: drawn hatched
    freezing.on_load_checkpoint(None, None, {})
    assert not freezing.throughput_history


class PerSampleViT(ViTModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = torch.nn.functional.cross_entropy(self.model(x), y, reduction="none")
        return {"loss": losses.mean(), "sample_losses": losses}


def test_under_infobatch_plan_and_actual_freezes_share_the_run_position(tmp_path):
    """InfoBatch's shorter epochs: the plan lies on the run position (full-data steps), so the actual
    freezes are drawn there too, each at the first position at or past its plan."""
    from lit_efficient import InfoBatch

    freezing = FreezeOut(t0=0.3, warp="linear")
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = make_trainer(tmp_path, [freezing, InfoBatch(prune_ratio=0.9)], -1, max_epochs=8, logger=logger,
                           log_every_n_steps=2)
    trainer.fit(PerSampleViT(), image_loader(n=64, batch=8))
    planned = freezing.planned_freeze_positions()
    assert freezing.frozen == 4 and trainer.global_step < 8 * 8  # pruning shortened the run
    assert trainer.global_step < freezing.freeze_positions[-1]  # positions run ahead of the optimizer steps
    for plan, actual in zip(planned, freezing.freeze_positions):
        assert plan <= actual <= plan + 8, (planned, freezing.freeze_positions)  # within one full-data epoch
    assert figure_steps(events_of(logger.log_dir), TAG)


class SlowEpochStart(pl.Callback):
    """Another callback's epoch work (a pruning decision, a loader starting) on a fake clock: 100 s
    at each epoch's start, 1 s for each training batch, and a figure that takes 50 s to draw every
    third step."""

    def __init__(self, clock):
        self.clock = clock

    def on_train_epoch_start(self, trainer, pl_module):
        self.clock[0] += 100.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lit_efficient.core.figures import log_figure

        self.clock[0] += 1.0
        if trainer.global_step % 3 == 0:
            assert log_figure(trainer, "other", "slow", lambda figure: self.clock.__setitem__(0, self.clock[0] + 50))


def test_throughput_windows_open_at_a_training_batch_and_leave_the_epoch_boundaries_out(tmp_path, monkeypatch):
    import lit_efficient.core.logs as logs

    clock = [0.0]
    monkeypatch.setattr(logs.time, "perf_counter", lambda: clock[0])
    freezing = FreezeOut(t0=0.3, warp="linear")
    trainer = make_trainer(tmp_path, [SlowEpochStart(clock), freezing], STEPS, log_every_n_steps=2,
                           logger=TensorBoardLogger(tmp_path, name="tb"))
    trainer.fit(ViTModule(), image_loader())
    windows = freezing.throughput.windows
    # never one of the 100 s epoch starts, nor the 50 s of another callback's figure
    assert windows and all(seconds <= 2.0 for _, seconds in windows), windows
    assert sum(seconds for _, seconds in windows) == STEPS  # and every training batch is in one
