import lightning.pytorch as pl
import pytest
import torch
from sparse_helpers import MLP, loader, trainer
from torch import nn

from lit_efficient import NMSparsity
from lit_efficient.core.targets import select_targets
from lit_efficient.sparsity.nm import nm_group_dim, nm_mask


def groups_of(tensor, m, dim):
    return tensor.movedim(dim, -1).reshape(-1, m)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 3)])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m):
    w = torch.randn(6, 4 * m)
    mask = nm_mask(w, n, m)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    kept, values = groups_of(mask, m, 1), groups_of(w.abs(), m, 1)
    assert (kept.sum(1) == n).all()
    # every kept magnitude is at least every dropped one of the same group
    smallest_kept = torch.where(kept, values, torch.inf).min(1).values
    largest_dropped = torch.where(kept, -torch.inf, values).max(1).values
    assert (smallest_kept >= largest_dropped).all()


def test_nm_groups_run_along_the_reduction_dimension():
    conv = nn.Conv2d(8, 3, 3)
    mask = nm_mask(conv.weight, 2, 4, dim=1)  # along input channels, for every kernel position
    assert (groups_of(mask, 4, 1).sum(1) == 2).all()
    assert groups_of(mask, 4, 1).shape[0] == 3 * 3 * 3 * 2

    from transformers.pytorch_utils import Conv1D  # GPT-2 stores (in, out)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.proj, self.head = nn.Linear(4, 8), Conv1D(12, 8), nn.Linear(12, 2)

    (target,) = select_targets(Block(), ["proj"], None, kinds=("linear", "conv"))
    assert target.transposed and nm_group_dim(target) == 0
    mask = nm_mask(target.param, 2, 4, nm_group_dim(target))
    assert (mask.t().reshape(12, 2, 4).sum(-1) == 2).all()


def test_ragged_dimension_is_rejected():
    with pytest.raises(ValueError, match="not divisible by m=4"):
        nm_mask(torch.randn(3, 6), 2, 4)


class Recorder(pl.Callback):
    """Records, at every training forward, the weight the targeted layer computed with, and the
    gradient the optimizer is about to use."""

    def __init__(self, module):
        self.forward_weights, self.grads, self.weights = [], [], []
        module.register_forward_hook(lambda mod, args, out: self.forward_weights.append(mod.weight.detach().clone()))
        self.module = module

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(self.module.weight.grad.clone())
        self.weights.append(self.module.weight.detach().clone())


def test_forward_uses_nm_weights_and_the_model_ends_nm_sparse(tmp_path):
    model = MLP()
    keys = set(model.state_dict())
    layer = model.net[2]
    param = layer.weight
    nm = NMSparsity()
    recorder = Recorder(layer)
    trainer(tmp_path, [nm, recorder], 8).fit(model, loader())
    assert [t.name for t in nm.targets] == ["net.0", "net.2", "net.4"]  # the head is left dense
    for w in recorder.forward_weights:
        assert (groups_of(w != 0, 4, 1).sum(1) <= 2).all()
    # the dense weights kept learning (straight-through), then the mask was written into them
    assert layer.weight is param and isinstance(param, nn.Parameter)
    assert (groups_of(param != 0, 4, 1).sum(1) <= 2).all()
    assert (model.net[6].weight != 0).all(), "untargeted layers stay dense"
    assert set(model.state_dict()) == keys, "state-dict keys never change"
    assert not nm._handles, "hooks removed at the end of fit"


def test_sr_ste_gradient(tmp_path):
    """Straight-through gradient to pruned weights, plus decay·(1 − M)⊙W once per optimizer step."""

    def first_step(decay, accumulate=1):
        pl.seed_everything(0)
        model = MLP()
        recorder = Recorder(model.net[2])
        trainer(tmp_path, [NMSparsity(decay=decay), recorder], 1, accumulate_grad_batches=accumulate).fit(
            model, loader())
        return recorder.weights[0], recorder.grads[0]

    weight, plain = first_step(0.0)
    pruned = ~nm_mask(weight, 2, 4)
    assert (plain[pruned] != 0).any(), "pruned weights receive the straight-through gradient"
    for accumulate in (1, 2):
        weight_a, plain_a = first_step(0.0, accumulate)
        _, refined = first_step(0.5, accumulate)
        torch.testing.assert_close(refined - plain_a, 0.5 * weight_a * pruned, rtol=0, atol=1e-6)


class FlipRates(pl.Callback):
    def __init__(self, nm):
        self.nm, self.rates = nm, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append(self.nm.flip_rate)


def test_sr_ste_decay_settles_the_mask(tmp_path):
    late_flips = {}
    for decay in (0.0, 0.05):
        pl.seed_everything(0)
        nm = NMSparsity(decay=decay)
        watch = FlipRates(nm)
        trainer(tmp_path, [nm, watch], 40).fit(MLP(optimizer="sgd"), loader(n=256, batch=32))
        assert watch.rates[0] == 0.0 and max(watch.rates) > 0
        late_flips[decay] = sum(watch.rates[-10:])
    assert late_flips[0.05] < late_flips[0.0]


def test_resume_matches_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt=None):
        pl.seed_everything(0)
        model = MLP()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=5, save_top_k=-1,
                                save_on_train_epoch_end=True)
        t = trainer(tmp_path, [NMSparsity(), saver], -1, max_epochs=12, deterministic=True, enable_checkpointing=True)
        t.fit(model, loader(n=16, batch=16), ckpt_path=ckpt)
        return model

    straight = run()
    ckpt = str(tmp_path / "ckpts" / "epoch=4-step=5.ckpt")
    torch.load(ckpt, weights_only=True)
    resumed = run(ckpt=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_export_without_a_gpu_explains_and_keeps_the_pattern(tmp_path):
    model = MLP()
    nm = NMSparsity(export_semi_structured=True)
    if torch.cuda.is_available():
        pytest.skip("checks the CPU message")
    with pytest.warns(UserWarning, match="needs a CUDA GPU"):
        trainer(tmp_path, [nm], 2).fit(model, loader())
    assert type(model.net[2].weight) is nn.Parameter
    assert (groups_of(model.net[2].weight != 0, 4, 1).sum(1) <= 2).all()
    with pytest.warns(UserWarning, match="only 2:4"):
        NMSparsity(n=1, m=4).export()


def test_savings_rows(tmp_path):
    nm = NMSparsity(n=1, m=4)
    trainer(tmp_path, [nm], 2).fit(MLP(), loader())
    rows = {r.quantity: r for r in nm.savings(None, None)}
    assert rows["weights of targeted layers"].value.startswith("1:4")
    assert rows["inference FLOPs (targeted layers, N:M kernels)"].ratio == pytest.approx(0.25)
    assert rows["training FLOPs (targeted layers, N:M kernels)"].ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,argument",
    [({"n": 5, "m": 4}, "`n` must not exceed `m`"), ({"n": 0}, "`n`"), ({"m": 2.0}, "`m`"),
     ({"decay": -1.0}, "`decay`"), ({"include": [""]}, "`include`")],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        NMSparsity(**kwargs)


def test_layers_whose_input_is_not_divisible_by_m_fail_before_training(tmp_path):
    model = MLP()
    with pytest.raises(ValueError, match=r"divisible by `m`=3.*net\.2"):
        trainer(tmp_path, [NMSparsity(n=1, m=3)], 2).fit(model, loader())


def test_tied_weights_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    class LM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))

    # GPT-2's head is the embedding matrix: not a Linear weight N:M can handle
    with pytest.raises(ValueError, match="`include` pattern 'lm_head'"):
        NMSparsity(include=["lm_head"]).setup(trainer(tmp_path, [], 1), LM(), "fit")

    model = MLP()
    model.net[4].weight = model.net[2].weight = nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match="tied weights"):
        NMSparsity().setup(trainer(tmp_path, [], 1), model, "fit")


def test_weight_magnitudes_on_logging_steps_and_sparsity_in_the_progress_bar(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from figure_events import events_of, histogram_steps

    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [NMSparsity(n=1, m=4)], 9, logger=logger, log_every_n_steps=3)
    t.fit(MLP(), loader(n=64, batch=8))
    assert histogram_steps(events_of(logger.log_dir), "efficient/nm/weight_magnitude") == [3, 6, 9]
    assert t.progress_bar_metrics["sparsity"] == 0.75
    t = trainer(tmp_path, [NMSparsity(progress_bar=False)], 2)
    t.fit(MLP(), loader())
    assert "sparsity" not in t.progress_bar_metrics
