import logging
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient.core.callback import EfficientCallback
from lit_efficient.core.logs import log_histogram, log_image, metric_key, tensorboard_writer
from lit_efficient.core.savings import SavingsRow, format_savings_table


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), batch_size=4)


class Probe(EfficientCallback):
    """Logs what a technique would: a step counter, a histogram, a density image, a savings row."""

    technique = "probe"

    def __init__(self, name="probe", ratio=0.5):
        self.technique = name
        self.ratio = ratio
        self.reported = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.log_metrics(pl_module, {"step_seen": float(trainer.global_step), "tensor": torch.tensor(2.0)})
        log_histogram(trainer, self.technique, "weights", pl_module.layer.weight)
        log_image(trainer, self.technique, "density", torch.linspace(0, 1, 15).repeat(32, 1))

    def savings(self, trainer, pl_module):
        self.reported += 1
        return [SavingsRow(self.technique, "training FLOPs", f"{self.ratio:.0%} of dense", self.ratio)]


def fit(tmp_path, callbacks, logger):
    trainer = pl.Trainer(max_steps=8, callbacks=callbacks, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Regression())
    return trainer


def test_metric_key():
    assert metric_key("granet", "sparsity") == "efficient/granet/sparsity"


def test_scalars_histograms_images_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [Probe()], logger)
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    scalars = events.Scalars("efficient/probe/step_seen")
    assert [e.value for e in scalars] == [float(s) for s in range(1, 9)]
    assert [e.value for e in events.Scalars("efficient/probe/tensor")] == [2.0] * 8
    assert len(events.Histograms("efficient/probe/weights")) == 8
    image = events.Images("efficient/probe/density")[-1]
    assert image.width == 15 and image.height == 32
    # the savings table goes to the Text tab too
    text = events.Tensors("efficient/report/savings/text_summary")[-1]
    assert b"training FLOPs" in text.tensor_proto.string_val[0]
    # and its ratios as metrics beside the callbacks' settings in the HPARAMS tab
    assert [e.value for e in events.Scalars("efficient/report/probe/training_FLOPs")] == [0.5]
    assert logger.hparams["probe/ratio"] == 0.5
    assert "hparams" in events.PluginTagToContent("hparams") or events.PluginTagToContent("hparams")


def test_without_tensorboard_logger_nothing_breaks(tmp_path):
    probe = Probe()
    trainer = fit(tmp_path, [probe], CSVLogger(tmp_path))
    assert tensorboard_writer(trainer) is None
    assert probe.reported == 1


def test_one_savings_table_from_all_callbacks(tmp_path, caplog):
    first, second = Probe("alpha", 0.25), Probe("beta", 0.5)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [first, pl.callbacks.Timer(), second], False)
    reports = [r.getMessage() for r in caplog.records if "lit_efficient savings" in r.getMessage()]
    assert len(reports) == 1
    assert "alpha" in reports[0] and "beta" in reports[0]
    assert reports[0].index("alpha") < reports[0].index("beta")
    assert first.reported == second.reported == 1


def test_format_savings_table():
    table = format_savings_table([SavingsRow("granet", "weights", "90.0% sparse"),
                                  SavingsRow("galore", "optimizer state", "1.0 MB", 0.3, "AdamW")])
    lines = table.splitlines()
    assert lines[0].startswith("| technique") and len(lines) == 4
    assert "0.3x AdamW" in lines[3]
    assert len({len(line) for line in lines}) == 1


def test_step_metrics_are_logged_only_on_the_steps_lightning_writes(tmp_path, monkeypatch):
    calls = []
    original = pl.LightningModule.log
    monkeypatch.setattr(pl.LightningModule, "log",
                        lambda self, name, *a, **k: (calls.append(name), original(self, name, *a, **k)))
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_steps=8, callbacks=[Probe()], logger=logger, log_every_n_steps=4,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Regression())
    # two metrics on steps 4 and 8 only, each self.log call being ~1 ms of a CPU step
    assert calls.count("efficient/probe/step_seen") == 2 and len(calls) == 4
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert [e.value for e in events.Scalars("efficient/probe/step_seen")] == [4.0, 8.0]


class EveryThird(EfficientCallback):
    """An event (a mask update, a basis refresh) on steps 3, 6, 9, ...: most are not logging steps."""

    technique = "events"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % 3 == 0:
            self.log_metrics(pl_module, {"update": float(trainer.global_step)}, event=True)
            self.log_metrics(pl_module, {"ordinary": float(trainer.global_step)})


def test_event_scalars_reach_the_logger_on_their_step_and_ordinary_ones_wait_for_a_logging_step(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_steps=16, callbacks=[EveryThird()], logger=logger, log_every_n_steps=4,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Regression())
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    updates = events.Scalars("efficient/events/update")
    # on the axis Lightning writes step metrics at (the step's index, one behind global_step), as the
    # ordinary scalar of logging step 12 is; Lightning writes the last step's values again at the end
    assert [(e.step, e.value) for e in updates] == [(2, 3), (5, 6), (8, 9), (11, 12), (14, 15), (15, 12)]
    assert [(e.step, e.value) for e in events.Scalars("efficient/events/ordinary")] == [(11, 12), (15, 12)]


@pytest.mark.parametrize("with_logger", [True, False])
def test_the_savings_table_is_written_as_markdown_in_the_logs_directory(tmp_path, with_logger):
    logger = TensorBoardLogger(tmp_path, name="tb") if with_logger else False
    trainer = fit(tmp_path, [Probe("alpha", 0.25), Probe("beta", 0.5)], logger)
    if not with_logger:  # no logs, no file: nothing lands in the working directory either
        assert not (tmp_path / "savings.md").exists() and not os.path.exists("savings.md")
        return
    text = open(os.path.join(trainer.log_dir, "savings.md")).read()
    assert "At step 8." in text and "| alpha " in text and "| beta " in text and "0.25x dense" in text


# -- figures and the progress bar ---------------------------------------------------------------------
class Drawer(EfficientCallback):
    """Draws a bar chart on steps in ``at`` and shows a progress entry that changes every 3 steps."""

    technique = "drawer"

    def __init__(self, at=(3,), progress_bar=True):
        self.at = set(at)
        self.progress_bar = progress_bar
        self.sent = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lit_efficient.core.figures import bar_chart, log_figure

        if trainer.global_step in self.at:
            log_figure(trainer, self.technique, "chart",
                       lambda f: bar_chart(f, ["a", "b"], {"actual": [0.2, 0.4]}, "density", "density"))
        self.show_progress(pl_module, "level", float(trainer.global_step // 3))


def test_figures_are_written_at_their_size_only_when_asked(tmp_path):
    from figure_events import events_of, figure_steps

    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [Drawer(at=(3, 6))], logger)
    events = events_of(logger.log_dir)
    assert figure_steps(events, "efficient/drawer/chart") == [3, 6]
    image = events.Images("efficient/drawer/chart")[0]
    assert (image.width, image.height) == (800, 500)


def test_the_savings_table_says_what_drawing_the_figures_cost(tmp_path):
    from lit_efficient.core.callback import collect_savings

    trainer = fit(tmp_path, [Drawer(at=(3, 6))], TensorBoardLogger(tmp_path, name="tb"))
    (row,) = [r for r in collect_savings(trainer, trainer.lightning_module) if r.technique == "figures"]
    assert row.value.endswith(" s for 2 pictures") and row.ratio is None  # this fit's two, not the process's
    trainer = fit(tmp_path, [Drawer(at=(3, 6))], False)  # no TensorBoard: nothing drawn, no row
    assert not [r for r in collect_savings(trainer, trainer.lightning_module) if r.technique == "figures"]


def test_without_matplotlib_figures_are_skipped_with_one_message(tmp_path, monkeypatch):
    import sys

    from lit_efficient.core import figures

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(figures, "_available", None)
    logger = TensorBoardLogger(tmp_path, name="tb")
    with pytest.warns(UserWarning, match="matplotlib is not installed") as caught:
        trainer = fit(tmp_path, [Drawer(at=(2, 3, 4, 5))], logger)
    assert sum("matplotlib is not installed" in str(w.message) for w in caught) == 1
    assert trainer.progress_bar_metrics["level"] == 2.0
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == []


def test_progress_bar_entry_is_sent_when_it_changes_and_kept_between(tmp_path, monkeypatch):
    sent = []
    original = pl.LightningModule.log

    def counting_log(self, name, value, *args, **kwargs):
        if name == "level":
            sent.append((self.trainer.global_step, value, kwargs["prog_bar"], kwargs["logger"]))
        return original(self, name, value, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counting_log)
    trainer = pl.Trainer(max_steps=8, callbacks=[Drawer(at=())], logger=False, log_every_n_steps=50,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Regression())
    # steps 1..8 show 0, 0, 1, 1, 1, 2, 2, 2: sent at 1, 3 and 6 only, never to the loggers
    assert [(s, v) for s, v, _, _ in sent] == [(1, 0.0), (3, 1.0), (6, 2.0)]
    assert all(bar and not logged for _, _, bar, logged in sent)
    assert trainer.progress_bar_metrics["level"] == 2.0

    sent.clear()
    trainer = pl.Trainer(max_steps=8, callbacks=[Drawer(at=(), progress_bar=False)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(Regression())
    assert sent == [] and "level" not in trainer.progress_bar_metrics


def test_once_an_epoch_figures_are_drawn_about_sixteen_times_in_a_long_run():
    from types import SimpleNamespace

    from lit_efficient.core.figures import epoch_figure_due, run_epochs

    def trainer(epoch, max_epochs=40, max_steps=-1, batches=23, global_step=0):
        return SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, max_steps=max_steps,
                               num_training_batches=batches, accumulate_grad_batches=1, global_step=global_step)

    assert all(epoch_figure_due(trainer(e, max_epochs=16)) for e in range(16))  # short runs: every epoch
    drawn = [e for e in range(40) if epoch_figure_due(trainer(e))]  # the README job's 40 epochs
    assert drawn == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 39]  # every third, and the last
    # a run bounded by steps: 1000 steps of 10 batches are 100 epochs
    assert run_epochs(trainer(0, max_epochs=-1, max_steps=1000, batches=10)) == 100
    assert [e for e in range(100) if epoch_figure_due(trainer(e, max_epochs=-1, max_steps=1000, batches=10))][-3:] \
        == [90, 97, 99]
    assert epoch_figure_due(trainer(50, max_epochs=-1, max_steps=1000, batches=10, global_step=1000))  # it ends here
    assert run_epochs(trainer(0, max_epochs=-1, max_steps=-1)) is None and epoch_figure_due(trainer(3, max_epochs=-1))
