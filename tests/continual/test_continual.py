"""The continual-learning protocol: tasks from epochs, the reservoir buffer, replay losses, the
accuracy matrix, and Split-digits with ER/DER++ end to end."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from examples.vision.continual import ContinualClassifier, SplitDigits
from lit_efficient.continual.metrics import AccuracyMatrix, average_accuracy, draw_accuracy_matrix, forgetting
from lit_efficient.continual.rehearsal import ReservoirBuffer, rehearsal_loss
from lit_efficient.core.tasks import task_of_epoch


def test_task_of_epoch():
    assert task_of_epoch(0, 5, 3).task == 0 and task_of_epoch(0, 5, 3).is_first_epoch
    p = task_of_epoch(9, 5, 3)
    assert (p.task, p.epoch_in_task, p.is_last_epoch) == (1, 4, True)
    assert task_of_epoch(40, 5, 3).task == 2  # past the end: the last task


def test_reservoir_fills_in_order_then_keeps_a_uniform_sample():
    buffer = ReservoirBuffer(100, seed=0)
    buffer.add(torch.arange(60).float().view(60, 1), torch.arange(60))
    assert len(buffer) == 60 and buffer.labels[:60].tolist() == list(range(60))
    for start in range(60, 10_000, 100):
        buffer.add(torch.arange(start, start + 100).float().view(100, 1), torch.arange(start, start + 100))
    assert len(buffer) == 100 and buffer.seen == 10_060
    labels = buffer.labels
    assert len(set(labels.tolist())) == 100
    # uniform over everything seen: about half the kept samples come from the second half
    assert 30 < int((labels >= 5_030).sum()) < 70


def test_reservoir_state_round_trip_continues_identically():
    a = ReservoirBuffer(10, seed=3)
    a.add(torch.randn(25, 2), torch.arange(25), torch.randn(25, 4))
    b = ReservoirBuffer(10, seed=99)
    b.load_state_dict(a.state_dict())
    xa, ya, za = a.sample(4)
    xb, yb, zb = b.sample(4)
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(za, zb)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)
    with pytest.raises(ValueError, match="holds 10"):
        ReservoirBuffer(5).load_state_dict(a.state_dict())


def test_rehearsal_losses():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    buffer = ReservoirBuffer(8, seed=0)
    assert rehearsal_loss(net, buffer, 4, "derpp") is None  # empty: nothing to replay
    x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
    buffer.add(x, y, net(x).detach())
    assert rehearsal_loss(net, buffer, 4, "none") is None
    er = rehearsal_loss(net, buffer, 8, "er")
    assert torch.allclose(er, F.cross_entropy(net(x), y))  # all 8 stored, order does not matter for the mean
    derpp = rehearsal_loss(net, buffer, 8, "derpp", alpha=0.3, beta=0.5)
    assert torch.allclose(derpp, 0.5 * F.cross_entropy(net(x), y))  # stored logits = current: MSE term 0
    with pytest.raises(ValueError, match="method"):
        rehearsal_loss(net, buffer, 4, "gem")


def test_average_accuracy_and_forgetting():
    nan = float("nan")
    matrix = torch.tensor([[90.0, nan, nan], [70.0, 95.0, nan], [60.0, 80.0, 99.0]])
    assert average_accuracy(matrix) == pytest.approx((60 + 80 + 99) / 3)
    assert average_accuracy(matrix, after_task=1) == pytest.approx(82.5)
    assert forgetting(matrix) == pytest.approx(((90 - 60) + (95 - 80)) / 2)
    assert forgetting(matrix, after_task=0) == 0.0
    pytest.importorskip("matplotlib")
    from lit_efficient.core.figures import render

    picture = render(lambda figure: draw_accuracy_matrix(figure, matrix, "val/acc_cil", 2))
    assert picture.shape[0] >= 400 and picture.shape[1] >= 600 and picture.shape[2] == 3
    assert picture.std() > 10  # cells, labels and numbers, not a blank canvas


def test_split_digits_tasks_hold_their_classes():
    data = SplitDigits()
    seen = []
    for task in range(5):
        labels = set(data.train_dataset(task).tensors[1].tolist())
        assert labels == set(data.task_classes(task)) == set(data.val_dataset(task).tensors[1].tolist())
        seen.append(len(data.train_dataset(task)))
    assert sum(seen) == 1437
    with pytest.raises(ValueError, match="10 labels"):
        SplitDigits(num_tasks=6)
    with pytest.raises(ValueError, match="epochs_per_task"):
        SplitDigits(epochs_per_task=0)


def test_too_many_epochs_for_the_tasks_is_refused():
    trainer = pl.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with pytest.raises(ValueError, match="at most 4"):
        trainer.fit(ContinualClassifier(width=8), datamodule=SplitDigits(num_tasks=2, epochs_per_task=2))


@pytest.mark.parametrize("method", ["none", "derpp"])
def test_tasks_run_in_order_and_the_accuracy_matrix_fills(tmp_path, method):
    pl.seed_everything(0)
    matrix = AccuracyMatrix()
    seen = []

    class Tasks(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, tuple(sorted(set(batch[1].tolist())))))

    trainer = pl.Trainer(max_epochs=9, callbacks=[matrix, Tasks()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    model = ContinualClassifier(method=method, buffer_size=100, width=8, lr=0.05)
    trainer.fit(model, datamodule=SplitDigits(num_tasks=3, epochs_per_task=3))
    for epoch, labels in seen:
        task = epoch // 3
        assert set(labels) <= {2 * task, 2 * task + 1}
    cil = matrix.matrices["val/acc_cil"]
    til = matrix.matrices["val/acc_til"]
    assert not torch.isnan(cil).any()
    assert (til >= cil - 1e-6).all()  # choosing among the task's classes is never harder
    assert cil[0, 0] > 90 and cil[2, 2] > 90  # each task is learnt
    if method == "none":
        assert cil[2, 0] < 10 and forgetting(cil) > 80  # fine-tuning forgets the old classes entirely
    else:
        assert len(model.buffer) == 100 and model.buffer.logits is not None
        assert cil[2, 0] > 20 and average_accuracy(cil) > 50  # replay keeps some of them
