"""SparCL: the pure functions, then each part on Split-digits (tiny CNN, DER++): masks change only in
each task's exploration window at exactly the target sparsity, DGM keeps the intended fraction of
gradient entries, DDR removes the intended fraction and never loads a removed sample again in the
task, the task boundary resets the records, resume is exact, and bad input is refused."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from examples.vision.continual import ContinualClassifier, SplitDigits
from examples.vision.data import DigitsDataModule
from lit_efficient import SparCL
from lit_efficient.sparsity.sparcl import gradient_mask, removal_choice, tdm_update, update_forgetting

# -- pure functions ----------------------------------------------------------------------------------

def test_times_within_a_task_take_fractions_or_epochs_and_intervals_take_steps():
    from lit_efficient.core.tasks import TaskProgress

    by_fraction = SparCL(sparsity=0.5, mask_update_every=0.2, mask_fixed_from=0.8, removal_points=[0.1, 0.3])
    by_epochs = SparCL(sparsity=0.5, mask_update_every="2ep", mask_fixed_from="8ep", removal_points=["1ep", "3ep"],
                       gradient_mask_every="30st")
    assert by_epochs.gradient_mask_every == 30 and by_epochs.mask_update_every == "2ep"  # read back as given
    for callback in (by_fraction, by_epochs):
        callback.num_samples = 100
    for epoch in range(10):
        progress = TaskProgress(0, epoch, 10, 1)
        assert by_fraction.is_tdm_epoch(progress) == by_epochs.is_tdm_epoch(progress)
        assert by_fraction.removal_count(progress) == by_epochs.removal_count(progress)
    with pytest.raises(ValueError, match="`gradient_mask_every`"):
        SparCL(sparsity=0.5, gradient_mask_every="2ep")
    with pytest.raises(ValueError, match="`removal_points`"):
        SparCL(sparsity=0.5, removal_points=["10st"])


def test_tdm_update_drops_the_lowest_scores_and_regrows_only_where_it_was_inactive():
    weight = torch.tensor([[5.0, 0.1, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]])
    mask = weight != 0
    grad = torch.tensor([[0.0, 10.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    new = tdm_update(weight, mask, grad, explore=1, generator=torch.Generator().manual_seed(0), score_lambda=0.5)
    assert int(new.sum()) == int(mask.sum())
    # scores of the active: 5, 0.1 + 5 = 5.1, 3, 2, 4 -> the weight 2.0 (score 2) goes
    assert not new[1, 1] and new[0, 1] and new[0, 0] and new[0, 2] and new[1, 3]
    grown = new & ~mask
    assert int(grown.sum()) == 1 and not bool((grown & mask).any())


def test_tdm_update_regrowth_is_random_but_seeded():
    torch.manual_seed(0)
    weight = torch.randn(40, 40)
    mask = weight.abs() > 1.0
    a = tdm_update(weight, mask, None, 30, torch.Generator().manual_seed(1))
    b = tdm_update(weight, mask, None, 30, torch.Generator().manual_seed(1))
    c = tdm_update(weight, mask, None, 30, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == int(mask.sum())
    assert int((a & ~mask).sum()) == 30


def test_gradient_mask_keeps_the_largest_entries_above_the_tensors_quantile():
    torch.manual_seed(0)
    grad = torch.randn(20, 30)
    mask = torch.rand(20, 30) < 0.5
    kept = gradient_mask(grad, mask, 0.8)
    assert int(kept.sum()) == round(0.2 * 600)  # 80% of the tensor is zero afterwards
    assert not bool((kept & ~mask).any())
    assert grad.abs()[kept].min() >= grad.abs()[mask & ~kept].max()
    sparse = torch.rand(20, 30) < 0.1  # sparser than the gradient sparsity: the weight mask itself
    assert torch.equal(gradient_mask(grad, sparse, 0.8), sparse)


def test_forgetting_events_count_correct_to_incorrect_flips():
    prev = torch.full((4,), -1, dtype=torch.int8)
    events = torch.zeros(4, dtype=torch.long)
    learned = torch.zeros(4, dtype=torch.bool)
    for visit in ([1, 0, 1, -1], [0, 0, 1, 1], [1, 1, 0, 0], [0, -1, 1, 1]):
        update_forgetting(prev, events, learned, torch.tensor(visit, dtype=torch.int32))
    assert events.tolist() == [2, 0, 1, 1]
    assert learned.tolist() == [True, True, True, True]


def test_removal_takes_the_fewest_events_first_and_never_learned_last():
    events = torch.tensor([3, 0, 1, 0, 0, 2])
    learned = torch.tensor([True, True, True, False, True, True])
    removed = torch.tensor([False, False, False, False, True, False])
    newly = removal_choice(events, learned, removed, 2, torch.Generator().manual_seed(0))
    assert newly.nonzero().flatten().tolist() == [1, 2]  # 0 events (index 4 already removed), then 1 event
    everything = removal_choice(events, learned, removed, 10, torch.Generator().manual_seed(0))
    assert int(everything.sum()) == 5 and not everything[4]


# -- on Split-digits ----------------------------------------------------------------------------------

class Record(pl.Callback):
    """Masks, the task and the batch indices of every epoch; gradient statistics of every step."""

    def __init__(self, sparcl):
        self.sparcl, self.masks, self.tasks, self.batches, self.grads = sparcl, [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sparcl.ddr:
            self.batches.append((trainer.current_epoch, self.sparcl.task, self.sparcl._batch_indices.clone()))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after SparCL's (list order)
        masks = self.sparcl.masks
        active = [int(m.sum()) for m in masks.masks]
        nonzero = [int((p.grad != 0).sum()) for p in masks.params]
        outside = sum(int((p.grad[~m] != 0).sum()) for p, m in zip(masks.params, masks.masks))
        self.grads.append((active, nonzero, outside))

    def on_train_epoch_end(self, trainer, pl_module):
        self.masks.append([m.clone() for m in self.sparcl.masks.masks])
        self.tasks.append(self.sparcl.task)


def fit(sparcl, tasks=2, epochs=10, batch_size=32, max_epochs=None, ckpt=None, root=None, callbacks=(), method="derpp"):
    pl.seed_everything(0)
    model = ContinualClassifier(method=method, buffer_size=50, width=8)
    data = SplitDigits(num_tasks=tasks, epochs_per_task=epochs, batch_size=batch_size)
    record = Record(sparcl)
    trainer = pl.Trainer(max_epochs=max_epochs or tasks * epochs, callbacks=[sparcl, record, *callbacks], logger=False,
                         enable_checkpointing=bool(callbacks), enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, deterministic=True, limit_val_batches=0, default_root_dir=root)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt)
    return model, record, trainer


@pytest.fixture(scope="module")
def full_run():
    sparcl = SparCL(sparsity=0.75, mask_update_every=0.2, gradient_mask_every=4)
    model, record, trainer = fit(sparcl)
    return sparcl, model, record, trainer


def test_masks_change_only_in_each_tasks_exploration_window_at_exact_sparsity(full_run):
    sparcl, _, record, _ = full_run
    sizes = sparcl.masks.sizes()
    for epoch, masks in enumerate(record.masks):
        assert [int(m.sum()) for m in masks] == [round(0.25 * n) for n in sizes], epoch  # every layer, always
        before = record.masks[epoch - 1] if epoch else None
        changed = before is not None and any(not torch.equal(a, b) for a, b in zip(before, masks))
        done = epoch % 10 + 1  # epochs done in the task at this epoch's end
        # every 0.2 of a task = 2 epochs; fixed from 0.9 = epoch 9
        assert changed == (done in (2, 4, 6, 8)), (epoch, changed)
    assert sparcl.updates == 8


def test_dgm_keeps_the_intended_fraction_of_active_gradients_and_none_outside_the_mask(full_run):
    _, _, record, _ = full_run
    assert record.grads
    sizes = full_run[0].masks.sizes()
    for active, nonzero, outside in record.grads:
        assert outside == 0
        for nz, size in zip(nonzero, sizes):
            assert nz <= round(0.2 * size)  # 80% of each layer's gradient is zero (25% of its weights are active)
    # not vacuous: most steps keep about that many
    assert sum(sum(nonzero) for _, nonzero, _ in record.grads) > 0.18 * sum(sizes) * len(record.grads)


def test_ddr_removes_the_intended_fraction_and_never_loads_a_removed_sample_again(full_run):
    sparcl, _, record, trainer = full_run
    data = trainer.datamodule
    for task in range(2):
        size = len(data.train_dataset(task))
        seen_by_epoch = {}
        for epoch, t, indices in record.batches:
            if t == task:
                seen_by_epoch.setdefault(epoch, []).extend(indices.tolist())
        epochs = sorted(seen_by_epoch)
        assert len(epochs) == 10
        # removal at the end of epochs 1, 2, 3, 4 of the task (0.1 .. 0.4 of 10): 7.5% each
        counts = [len(set(seen_by_epoch[e])) for e in epochs]
        assert counts[0] == size and counts[-1] == size - round(0.3 * size), counts
        assert counts == sorted(counts, reverse=True)
        removed = set(range(size))
        for e in epochs:
            present = set(seen_by_epoch[e])
            assert present <= removed, "a removed sample came back"
            removed = present
    assert sparcl.task == 1 and int(sparcl.removed.sum()) == round(0.3 * len(data.train_dataset(1)))
    assert sparcl.removed_total == sum(round(0.3 * len(data.train_dataset(t))) for t in range(2))


def test_the_task_boundary_resets_the_records(full_run):
    _, _, record, _ = full_run
    assert record.tasks == [0] * 10 + [1] * 10


def test_savings_count_weights_gradients_and_data(full_run):
    sparcl, _, _, trainer = full_run
    rows = {r.quantity: r for r in sparcl.savings(trainer, trainer.lightning_module)}
    flops = rows["training FLOPs (targeted layers, fwd+bwd, all steps)"].ratio
    # per step: (2·0.25 + 0.2) / 3 ≈ 0.233 of dense; 30% of the data gone for most of each task
    assert 0.15 < flops < 0.233
    assert rows["weight-gradient FLOPs (targeted layers)"].ratio == pytest.approx(0.2, abs=0.005)
    assert "removed" in rows["training samples removed"].quantity


def test_each_part_switches_off():
    sparcl = SparCL(sparsity=0.75, tdm=False, dgm=False, ddr=False)
    _, record, _ = fit(sparcl, tasks=1, epochs=4, method="er")
    assert all(torch.equal(a, b) for masks in record.masks for a, b in zip(masks, record.masks[0]))
    assert sparcl.updates == 0 and not sparcl.grad_masks and sparcl.num_samples == 0
    assert any(nz > 0.9 * sum(active) for active, nonzero, _ in record.grads for nz in [sum(nonzero)])


def test_resume_in_the_middle_of_a_task_matches_the_uninterrupted_run(tmp_path):
    def run(ckpt=None):
        sparcl = SparCL(sparsity=0.75, gradient_mask_every=2)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=1, save_top_k=-1,
                                save_on_train_epoch_end=True)
        # one-batch epochs: Lightning restores the data order exactly only then
        model, _, trainer = fit(sparcl, tasks=2, epochs=6, batch_size=512, ckpt=ckpt, root=tmp_path, callbacks=[saver])
        return model, sparcl, trainer

    straight, a, _ = run()
    ckpt = tmp_path / "ckpts" / "epoch=7-step=8.ckpt"  # task 1, its second epoch: after a removal point
    state = torch.load(ckpt, weights_only=True)
    assert any("SparCL" in k for k in state["callbacks"])
    resumed, b, _ = run(str(ckpt))
    for (key, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), key
    assert torch.equal(straight.buffer.examples, resumed.buffer.examples)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        elif k == "grad_masks":
            assert all(torch.equal(x, y) for x, y in zip(sa[k], sb[k]))
        else:
            assert sa[k] == sb[k], k
    assert int(a.removed.sum()) > 0 and a.updates > 0


# -- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"removal_fraction": 1.0}, "removal_fraction"),
    ({"gradient_sparsity": 1.5}, "gradient_sparsity"), ({"mask_update_every": 0.0}, "mask_update_every"),
    ({"mask_fixed_from": 1.2}, "mask_fixed_from"), ({"score_lambda": -1}, "score_lambda"),
    ({"explore_fraction": 1.0}, "explore_fraction"), ({"gradient_mask_every": 0}, "gradient_mask_every"),
    ({"removal_points": []}, "removal_points"), ({"removal_points": [0.5, 1.0]}, "removal_points"),
    ({"tdm": "yes"}, "tdm"),
])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SparCL(**kwargs)


def test_sparcl_is_the_masked_training_base_plus_the_planned_order_not_the_periodic_schedule():
    import inspect

    from lit_efficient import RigL
    from lit_efficient.data.planned_order import PlannedOrder
    from lit_efficient.sparsity.callback import SparseTrainingCallback
    from lit_efficient.sparsity.masked import MaskedTraining

    parameters = inspect.signature(SparCL.__init__).parameters
    assert "update_every" not in parameters and "distribution" not in parameters
    assert not issubclass(SparCL, SparseTrainingCallback)
    assert issubclass(SparCL, MaskedTraining) and issubclass(SparCL, PlannedOrder)
    sparcl = SparCL()
    assert not hasattr(sparcl, "update_every") and not hasattr(sparcl, "distribution")
    # the periodic schedule stays where GraNet, RigL and SET need it
    assert issubclass(RigL, SparseTrainingCallback) and issubclass(SparseTrainingCallback, MaskedTraining)
    assert {"update_every", "distribution"} <= set(inspect.signature(RigL.__init__).parameters)


def test_no_task_information_is_refused_before_training():
    trainer = pl.Trainer(max_epochs=1, callbacks=[SparCL()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="num_tasks"):
        trainer.fit(ContinualClassifier(width=8), datamodule=DigitsDataModule())


def test_data_removal_without_sample_correct_says_what_to_return():
    class NoCorrect(ContinualClassifier):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            del out["sample_correct"]
            return out

    trainer = pl.Trainer(max_epochs=1, callbacks=[SparCL()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="sample_correct"):
        trainer.fit(NoCorrect(width=8), datamodule=SplitDigits(num_tasks=2, epochs_per_task=1))


def test_tensorboard_shows_the_accuracy_matrix_sparsity_gradients_and_removed_data(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from figure_events import figure_steps, keep_figure
    from lit_efficient.continual.metrics import AccuracyMatrix

    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_epochs=4, callbacks=[AccuracyMatrix(), SparCL(sparsity=0.75)], logger=logger,
                         log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(ContinualClassifier(width=8, buffer_size=50), datamodule=SplitDigits(num_tasks=2, epochs_per_task=2))
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images, scalars = events.Tags()["images"], events.Tags()["scalars"]
    assert {"efficient/continual/val/acc_cil/matrix", "efficient/continual/val/acc_til/matrix",
            "efficient/sparcl/layer_density"} <= set(images)
    for name in ("sparsity", "gradient_sparsity", "removed_fraction", "task", "forgetting_events_mean"):
        assert f"efficient/sparcl/{name}" in scalars, name
    averages = events.Scalars("efficient/continual/val/acc_cil/average")
    assert len(averages) == 2 and all(0 <= e.value <= 100 for e in averages)  # one per task
    for key in ("val/acc_cil", "val/acc_til"):  # a readable heat map at each task's end, and only then
        assert figure_steps(events, f"efficient/continual/{key}/matrix") == [e.step for e in averages]
    keep_figure(events, "efficient/continual/val/acc_cil/matrix", "sparcl_accuracy_matrix")
    removed = [e.value for e in events.Scalars("efficient/sparcl/removed_fraction")]
    assert max(removed) == pytest.approx(0.3, abs=0.01)


def test_data_removal_figure_at_each_removal_point_and_removed_in_the_progress_bar(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from figure_events import events_of, figure_steps, histogram_steps, keep_figure

    drawn = []
    original = SparCL.draw_removal

    def recording(self, trainer, newly):
        drawn.append((trainer.current_epoch, trainer.global_step, int(newly.sum())))
        return original(self, trainer, newly)

    monkeypatch.setattr(SparCL, "draw_removal", recording)
    pl.seed_everything(0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = SparCL(sparsity=0.75, removal_points=[0.25, 0.5])
    trainer = pl.Trainer(max_epochs=8, callbacks=[callback], logger=logger, log_every_n_steps=5,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(ContinualClassifier(width=8, buffer_size=50), datamodule=SplitDigits(num_tasks=2, epochs_per_task=4))
    # removal points 0.25 and 0.5 of a 4-epoch task: the ends of each task's epochs 1 and 2
    assert [epoch for epoch, _, _ in drawn] == [0, 1, 4, 5] and all(n > 0 for *_, n in drawn)
    events = events_of(logger.log_dir)
    steps = [step for _, step, _ in drawn]
    assert figure_steps(events, "efficient/sparcl/data") == steps
    assert histogram_steps(events, "efficient/sparcl/forgetting_events") == steps
    assert figure_steps(events, "efficient/sparcl/layer_density") != []  # TDM updates draw the layers
    history = callback.state_dict()["removal_history"]
    assert [(e, t) for e, t, _ in history] == [(e, e // 4) for e in range(8)]
    assert history[3][2] == pytest.approx(0.3, abs=0.01) and history[4][2] < history[3][2]
    assert trainer.progress_bar_metrics["removed%"] == pytest.approx(30.0, abs=1.0)
    assert trainer.progress_bar_metrics["sparsity"] == pytest.approx(0.75, abs=0.01)
    keep_figure(events, "efficient/sparcl/data", "sparcl_data")
