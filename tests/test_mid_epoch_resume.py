"""Resume from a checkpoint taken in the middle of an epoch, with multi-batch epochs.

Users checkpoint every N steps (``ModelCheckpoint(every_n_train_steps=...)``) and get pre-empted
(SIGTERM), so checkpoints fall inside epochs — and, whenever the steps line up, on an epoch's last
batch, where Lightning 2.6 resumes into the next epoch without running the finished epoch's
``on_train_epoch_end`` (nor the next one's ``on_train_epoch_start``). For each callback that keeps
per-sample state, and for the examples' three main-job mixes, the resumed run must equal the
uninterrupted one bit for bit: weights, optimizer state and every callback's state.

InfoBatch and SparCL's data removal own the loader (a planned order that resumes at the first
batch not yet trained). The callbacks without a planner (LossReweighting, the DDPM mix) keep no
per-sample state: they are checked with a resumable loader (what torchdata's StatefulDataLoader
does, in a few lines here), and with a plain DataLoader, where Lightning replays the epoch's first
batches, for the state that does not depend on the data order.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import InfoBatch, SparCL
from tests.sparsity.sparse_helpers import MLP
from tests.techniques import ENTRIES as REGISTRY
from tests.test_reliability_matrix import SigtermAt, assert_same_run

SAMPLES, BATCH = 48, 8  # six batches an epoch (fewer once InfoBatch prunes)


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 16, generator=g)
    return x, x[:, :4].argmax(1)


def shuffled_loader():
    """A plain DataLoader that shuffles: InfoBatch plans its order from it (shuffled, seeded)."""
    return DataLoader(TensorDataset(*data()), batch_size=BATCH, shuffle=True)


class ResumableLoader:
    """Batches in a seeded order per epoch that resume mid-epoch (Lightning's stateful-loader protocol)."""

    def __init__(self, x, y, batch_size=BATCH, seed=0):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch, self.done = 0, 0

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for b in range(self.done, len(self)):
            # the position after this batch, as a checkpoint in its on_train_batch_end must record it
            self.epoch, self.done = (self.epoch + 1, 0) if b == len(self) - 1 else (self.epoch, b + 1)
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.x[index], self.y[index]

    def state_dict(self):
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state):
        self.epoch, self.done = int(state["epoch"]), int(state["done"])


def resumable_loader():
    return ResumableLoader(*data())


# every callback of the registry, and the main-job mixes: those with InfoBatch on its planned order
# (built from a plain shuffling DataLoader), the others on a resumable loader
PLANNED = {"infobatch", "vit_main_job", "lm_main_job"}
ENTRIES = {name: (factory, shuffled_loader if name in PLANNED else resumable_loader)
           for name, factory in REGISTRY.items()}
EPOCHS = 8
# The frozen-output cache is not part of checkpoints: a resumed run recomputes rows that the
# uninterrupted run served from memory, computed there in another batch (the last bit may differ)
TOLERANCE = {"freezeout_cached": 1e-6}


def assert_resumed(name, straight, resumed):
    if name not in TOLERANCE:
        return assert_same_run(straight, resumed)
    (a_model, a_callbacks, a_trainer), (b_model, b_callbacks, b_trainer) = straight, resumed
    assert a_trainer.global_step == b_trainer.global_step
    for (key, a), b in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.allclose(a, b, rtol=0, atol=TOLERANCE[name]), key
    for a, b in zip(a_callbacks, b_callbacks):
        assert a.state_dict() == b.state_dict(), type(a).__name__


def fit(root, name, ckpt=None, extra=(), every=None, loader=None):
    pl.seed_everything(0)
    factory, default_loader = ENTRIES[name]
    model, callbacks = MLP(), factory()
    savers = [ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=every, save_top_k=-1)] if every else []
    everything = [*callbacks, *savers, *extra]
    trainer = pl.Trainer(max_epochs=EPOCHS, callbacks=everything, logger=False, enable_progress_bar=False,
                         enable_checkpointing=any(isinstance(c, Checkpoint) for c in everything),
                         enable_model_summary=False, deterministic=True, default_root_dir=root)
    trainer.fit(model, (loader or default_loader)(), ckpt_path=ckpt)
    return model, callbacks, trainer


def where(path):
    """(epoch, batches of it trained, whether that was its last batch) of a checkpoint saved after a batch."""
    state = torch.load(path, weights_only=True)
    progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    return state["epoch"], progress["current"]["ready"], progress["is_last_batch"]


def pick_checkpoints(folder):
    """A checkpoint in the middle of an epoch and one on an epoch's last batch, both after epoch 1."""
    middle = last = None
    for path in sorted(folder.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1])):
        epoch, done, is_last = where(path)
        if epoch < 2:
            continue
        if is_last and last is None:
            last = path
        elif not is_last and done >= 2 and middle is None:
            middle = path
    assert middle is not None and last is not None
    return middle, last


@pytest.fixture(scope="module", params=sorted(ENTRIES))
def straight(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, root, fit(root, request.param, every=1)


def test_resume_from_the_middle_of_an_epoch_matches_the_uninterrupted_run(straight, tmp_path):
    name, root, run = straight
    middle, _ = pick_checkpoints(root / "ckpts")
    assert_resumed(name, run, fit(tmp_path, name, ckpt=str(middle)))


def test_resume_from_an_epochs_last_batch_matches_the_uninterrupted_run(straight, tmp_path):
    """Lightning resumes into the next epoch without the finished epoch's end hooks: our callbacks
    must still close that epoch (InfoBatch's scores and next plan, SparCL's forgetting records)."""
    name, root, run = straight
    _, last = pick_checkpoints(root / "ckpts")
    assert_resumed(name, run, fit(tmp_path, name, ckpt=str(last)))


@pytest.mark.parametrize("name", ["infobatch", "vit_main_job", "ddpm_main_job"])
def test_sigterm_in_the_middle_of_an_epoch_then_resume_loses_nothing(tmp_path, name):
    straight = fit(tmp_path / "straight", name)
    with pytest.raises(SystemExit):
        fit(tmp_path / "killed", name, extra=[SigtermAt(17), OnExceptionCheckpoint(dirpath=tmp_path / "preempted")])
    ckpt = tmp_path / "preempted" / "on_exception.ckpt"
    epoch, done, is_last = where(ckpt)
    assert epoch >= 2 and not is_last and done >= 1  # inside an epoch
    assert_same_run(straight, fit(tmp_path / "resumed", name, ckpt=str(ckpt)))


def test_loss_reweighting_state_is_right_with_a_plain_loader(tmp_path):
    """With a plain DataLoader Lightning replays the epoch's first batches after a mid-epoch resume:
    the data differ, but LossReweighting's state counts steps, not samples, and stays right."""
    plain = lambda: DataLoader(TensorDataset(*data()), batch_size=BATCH)  # noqa: E731
    straight = fit(tmp_path / "straight", "loss_reweighting", every=1, loader=plain)
    middle, _ = pick_checkpoints(tmp_path / "straight" / "ckpts")
    resumed = fit(tmp_path / "resumed", "loss_reweighting", ckpt=str(middle), loader=plain)
    assert straight[2].global_step == resumed[2].global_step
    assert straight[1][0].state_dict() == resumed[1][0].state_dict()


# -- every stored score belongs to its sample ---------------------------------------------------------


class IndexLoss(pl.LightningModule):
    """Each sample's loss is a known function of its dataset index (carried as the first feature)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    @staticmethod
    def expected(index):
        return 1.0 + index.double() / 64  # exact in float32 and float64

    def training_step(self, batch, batch_idx):
        (x,) = batch
        losses = self.expected(x[:, 0]).float() * self.w
        return {"loss": losses.mean(), "sample_losses": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the loss of a sample never changes


def test_every_infobatch_score_matches_its_sample_after_a_mid_epoch_resume(tmp_path):
    index = torch.arange(SAMPLES, dtype=torch.float32)[:, None]

    def run(ckpt=None, extra=()):
        pl.seed_everything(0)
        infobatch = InfoBatch(prune_ratio=0.5, delta=1.0)
        trainer = pl.Trainer(max_epochs=5, callbacks=[infobatch, *extra], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=bool(extra), default_root_dir=tmp_path)
        trainer.fit(IndexLoss(), DataLoader(TensorDataset(index), batch_size=BATCH, shuffle=True), ckpt_path=ckpt)
        return infobatch

    run(extra=[ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=1, save_top_k=-1)])
    for path in sorted((tmp_path / "ckpts").glob("*.ckpt")):
        epoch, done, is_last = where(path)
        if epoch == 2 and not is_last and done >= 2:
            break
    infobatch = run(ckpt=str(path))
    seen = infobatch.seen
    assert bool(seen.all())
    assert torch.equal(infobatch.scores[seen].double(), IndexLoss.expected(torch.arange(SAMPLES))[seen])


# -- SparCL's data removal ----------------------------------------------------------------------------


def test_sparcl_with_data_removal_resumes_from_the_middle_of_an_epoch(tmp_path):
    from examples.vision.continual import ContinualClassifier, SplitDigits

    def run(ckpt=None, every=None):
        pl.seed_everything(0)
        sparcl = SparCL(sparsity=0.75, mask_update_every=0.25, gradient_mask_every=3)
        model = ContinualClassifier(method="derpp", buffer_size=50, width=8)
        savers = ([ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=every, save_top_k=-1)]
                  if every else [])
        trainer = pl.Trainer(max_epochs=8, callbacks=[sparcl, *savers], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=bool(savers), num_sanity_val_steps=0,
                             deterministic=True, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, datamodule=SplitDigits(num_tasks=2, epochs_per_task=4, batch_size=64), ckpt_path=ckpt)
        return model, [sparcl], trainer

    straight = run(every=1)
    middle, last = pick_checkpoints(tmp_path / "ckpts")
    assert straight[1][0].removed.any()
    for ckpt in (middle, last):
        resumed = run(ckpt=str(ckpt))
        assert_same_run(straight, resumed)
        assert torch.equal(straight[0].buffer.examples, resumed[0].buffer.examples)
