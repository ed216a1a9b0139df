import lightning.pytorch as pl
import pytest
import torch
from sparse_helpers import MLP, loader, trainer

from lit_efficient import SET, RigL
from lit_efficient.sparsity.dst import rigl_drop_fraction


def test_drop_fraction_schedule():
    assert rigl_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert rigl_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert rigl_drop_fraction(100, 100, 0.3) == 0.0


class Record(pl.Callback):
    def __init__(self, sparse):
        self.sparse, self.counts, self.masks = sparse, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts[trainer.global_step] = self.sparse.masks.nonzeros()
        self.masks[trainer.global_step] = [m.clone() for m in self.sparse.masks.masks]
        assert self.sparse.masks.is_applied()


@pytest.mark.parametrize("cls", [RigL, SET])
def test_constant_density_and_updates_stop_at_stop(tmp_path, cls):
    sparse = cls(sparsity=0.8, update_every="4st", stop="20st", distribution="erk")
    record = Record(sparse)
    trainer(tmp_path, [sparse, record], 32).fit(MLP(), loader())
    counts = record.counts
    assert all(c == counts[1] for c in counts.values()), "every layer keeps its number of active weights"
    total = sum(sparse.masks.sizes())
    assert sum(counts[1]) == round(0.2 * total)
    changed = [s for s in range(2, 33)
               if any(not torch.equal(a, b) for a, b in zip(record.masks[s - 1], record.masks[s]))]
    assert changed == [4, 8, 12, 16]  # every 4 steps, none from step 20 on (the fraction is 0 there)
    assert sparse.updates == 4


def test_rigl_grows_where_the_gradient_is_largest(tmp_path):
    rigl = RigL(sparsity=0.9, update_every="5st", stop="6st", distribution="uniform")
    seen = {}

    class Spy(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step + 1 == 5:
                seen["grad"] = [p.grad.abs().clone() for p in rigl.masks.params]
                seen["before"] = [m.clone() for m in rigl.masks.masks]

    trainer(tmp_path, [rigl, Spy()], 5).fit(MLP(), loader())
    for grad, before, after in zip(seen["grad"], seen["before"], rigl.masks.masks):
        grown = after & ~before
        assert grown.any()
        # every grown position scores at least as high as every inactive position left unchosen
        left = ~after & ~before
        assert grad[grown].min() >= grad[left].max()


def test_set_with_a_constant_drop_fraction_replaces_the_same_share_every_update(tmp_path):
    sparse = SET(sparsity=0.8, update_every="4st", stop=1.0, drop_schedule="constant", drop_fraction=0.25)
    fractions = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            if trainer.global_step % 4 == 0:
                fractions.append(float(metrics["efficient/set/drop_fraction"]))

    trainer(tmp_path, [sparse, Spy()], 14, log_every_n_steps=1).fit(MLP(), loader())
    assert fractions == [0.25] * 3 and sparse.updates == 3


@pytest.mark.parametrize("kwargs, argument", [({"sparsity": 1.0}, "sparsity"),
                                              ({"drop_fraction": 1.0}, "drop_fraction"),
                                              ({"drop_schedule": "linear"}, "drop_schedule"),
                                              ({"stop": "later"}, "stop"), ({"update_every": -1}, "update_every")])
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        RigL(**kwargs)


@pytest.mark.parametrize("cls,expected", [(SET, 0.2), (RigL, (10 * 0.2 + 2 * (2 * 0.2 + 1) / 3) / 12)])
def test_training_flops_count_rigl_dense_gradients_at_updates(tmp_path, cls, expected):
    sparse = cls(sparsity=0.8, update_every="4st", stop=1.0, distribution="uniform")
    trainer(tmp_path, [sparse], 12).fit(MLP(), loader())  # updates after steps 4 and 8
    rows = {r.quantity: r.ratio for r in sparse.savings(None, None)}
    assert rows["inference FLOPs (targeted layers)"] == pytest.approx(0.2, abs=1e-3)
    assert rows["training FLOPs (targeted layers, fwd+bwd)"] == pytest.approx(expected, abs=1e-3)
