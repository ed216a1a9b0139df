import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient.core.time import Time, TrainingLength, interpolate, is_due, parse_time, progress, ramp


@pytest.mark.parametrize(
    "spec, value, unit",
    [(0.5, 0.5, "dur"), (1, 1.0, "dur"), (0, 0.0, "dur"), ("0.25dur", 0.25, "dur"), ("500st", 500, "st"),
     ("2ep", 2, "ep"), ("1.5ep", 1.5, "ep"), (" 10 st ", 10, "st"),
     ("500ba", 500, "st")],  # Composer's "ba" is an alias of "st"
)
def test_parse(spec, value, unit):
    t = parse_time(spec, "start")
    assert (t.value, t.unit) == (value, unit)


@pytest.mark.parametrize(
    "spec, fragment",
    [("500", "must be"), ("5 steps", "must be"), (1.5, "[0, 1]"), ("1.2dur", "[0, 1]"), (-0.1, "non-negative"),
     (500, "ambiguous"), ("2.5st", "whole number"), ("2.5ba", "whole number"), (None, "must be"), (True, "must be"),
     (float("nan"), "finite")],
)
def test_parse_errors_name_the_argument(spec, fragment):
    with pytest.raises(ValueError, match="`prune_end`") as err:
        parse_time(spec, "prune_end")
    assert fragment in str(err.value)


def test_to_steps():
    length = TrainingLength(total_steps=1000, steps_per_epoch=50)
    assert length.steps(0.5) == 500
    assert length.steps("0.75dur") == 750
    assert length.steps("20st") == 20
    assert length.steps("3ep") == 150
    assert length.steps("1.5ep") == 75
    assert str(Time.parse("3ep")) == "3ep"
    with pytest.raises(ValueError, match="`stop`.*run length is unknown"):
        TrainingLength(None, 10).steps(0.5, "stop")
    with pytest.raises(ValueError, match="`warmup`.*per epoch is unknown"):
        TrainingLength(100, None).steps("1ep", "warmup")


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.seen = None

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2)  # 5 batches per epoch


class _Probe(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        pl_module.seen = TrainingLength.from_trainer(trainer)


@pytest.mark.parametrize("accumulate, per_epoch", [(1, 5), (2, 3)])
def test_from_trainer_counts_optimizer_steps(tmp_path, accumulate, per_epoch):
    model = _Tiny()
    trainer = pl.Trainer(max_epochs=4, accumulate_grad_batches=accumulate, callbacks=[_Probe()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model)
    assert model.seen.steps_per_epoch == per_epoch
    assert model.seen.total_steps == 4 * per_epoch == trainer.global_step


def test_an_endless_run_has_no_length():
    # Lightning answers max_steps (-1) for an endless loader: a fraction of such a run must fail, not resolve to -1
    endless = SimpleNamespace(estimated_stepping_batches=-1, num_training_batches=float("inf"),
                              accumulate_grad_batches=1, callbacks=[], max_epochs=1, max_steps=-1)
    length = TrainingLength.from_trainer(endless)
    assert length.total_steps is None
    with pytest.raises(ValueError, match="run length is unknown"):
        length.steps(0.5, "freeze_start")


def test_ramps_hit_endpoints_exactly():
    for kind in ("linear", "cubic", "cosine"):
        assert ramp(kind, 0, 10, 110, 0.0, 0.9) == 0.0
        assert ramp(kind, 10, 10, 110, 0.0, 0.9) == 0.0
        assert ramp(kind, 110, 10, 110, 0.0, 0.9) == 0.9
        assert ramp(kind, 500, 10, 110, 0.0, 0.9) == 0.9
        values = [ramp(kind, t, 10, 110, 0.0, 0.9) for t in range(10, 111)]
        assert all(a <= b for a, b in zip(values, values[1:]))


def test_ramp_values():
    # Zhu & Gupta: s(t) = s_f + (s_i - s_f) (1 - p)^3
    assert interpolate("cubic", 0.5, 0.0, 0.8) == pytest.approx(0.8 + (0.0 - 0.8) * 0.125)
    assert interpolate("linear", 0.25, 1.0, 0.0) == pytest.approx(0.75)
    assert interpolate("cosine", 0.5, 0.5, 0.0) == pytest.approx(0.25)
    assert interpolate("cosine", 1 / 3, 1.0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert progress(5, 10, 10) == 0.0 and progress(10, 10, 10) == 1.0
    with pytest.raises(ValueError, match="unknown ramp"):
        interpolate("exp", 0.5, 0, 1)


def test_is_due():
    assert [s for s in range(0, 30) if is_due(s, 10, start=5, end=25)] == [5, 15, 25]
    assert not is_due(3, 0)


def test_step_intervals_take_ints_or_steps_and_refuse_run_fractions():
    from lit_efficient.core.time import step_interval

    assert step_interval(30, "every") == step_interval("30st", "every") == step_interval("30ba", "every") == 30
    for bad, fragment in ((0, "int >= 1"), ("0st", "int >= 1"), (0.5, "int >= 1"), ("2ep", "in epochs"),
                          ("0.5dur", "a fraction of the run"), (True, "int >= 1")):
        with pytest.raises(ValueError, match="`every`") as err:
            step_interval(bad, "every")
        assert fragment in str(err.value)


def test_times_within_a_task_are_fractions_or_epochs_of_it():
    from lit_efficient.core.tasks import task_epochs, task_time

    assert task_epochs(task_time(0.1, "at"), 50) == task_epochs(task_time("5ep", "at"), 50) == 5
    assert task_epochs(task_time(0.001, "at"), 50) == 1  # at least one epoch
    for bad in (0.0, "0ep", "10st", 1.5):
        with pytest.raises(ValueError, match="`at`"):
            task_time(bad, "at")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        task_time(1.0, "at", below_one=True)
