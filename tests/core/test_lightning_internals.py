"""The seam to Lightning's and torch's internals, function by function: each still reaches what it
claims to, so a Lightning or torch upgrade that moves a private attribute fails here first."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from lit_efficient.core import lightning_internals as seam
from lit_efficient.core.clock import StepWatch
from lit_efficient.core.protocols import PerParameterOptions, RestartableState, ShortensEpochs
from lit_efficient.lowrank.optim import GaLoreAdamW
from lit_efficient.reweighting.infobatch import InfoBatch


class Thing:
    def name(self):
        return "class"


def test_a_replaced_method_is_restored_whether_the_instance_had_one_or_not():
    thing = Thing()
    own = seam.replace_method(thing, "name", lambda: "patched")
    assert thing.name() == "patched" and own is None
    seam.restore_method(thing, "name", own)
    assert thing.name() == "class" and "name" not in thing.__dict__
    thing.name = lambda: "instance"
    own = seam.replace_method(thing, "name", lambda: "patched")
    seam.restore_method(thing, "name", own)
    assert thing.name() == "instance"


def test_find_unused_parameters_is_switched_on_once():
    strategy = DDPStrategy()
    assert seam.ensure_find_unused_parameters(strategy) is True
    assert seam.ensure_find_unused_parameters(strategy) is False
    assert seam.ensure_find_unused_parameters(DDPStrategy(find_unused_parameters=True)) is False
    assert seam.ensure_find_unused_parameters(object()) is False


def test_swap_parameter_puts_a_computed_tensor_in_the_slot_and_back():
    layer = nn.Linear(2, 2)
    weight = layer.weight
    dense = seam.swap_parameter(layer, "weight", weight * 0)
    assert dense is weight and torch.equal(layer(torch.ones(1, 2)), layer.bias.expand(1, 2))
    seam.swap_parameter(layer, "weight", dense)
    assert layer.weight is weight


def test_with_sampler_keeps_the_loader_and_changes_its_sampler():
    loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=4, drop_last=True)
    sampler = SequentialSampler(range(6))
    rebuilt = seam.with_sampler(loader, sampler)
    assert rebuilt.sampler is sampler and rebuilt.batch_size == 4 and rebuilt.drop_last


def test_scheduler_markers_keep_torch_from_warning_about_step_order(recwarn):
    p = nn.Parameter(torch.zeros(2))
    old, new = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([p], lr=0.1)
    chained = torch.optim.lr_scheduler.ChainedScheduler([torch.optim.lr_scheduler.StepLR(old, 1)])
    assert len(seam.inner_schedulers(chained)) == 1
    scheduler = seam.inner_schedulers(chained)[0]
    scheduler.optimizer = new
    seam.mark_step_tracked(new)
    new.step()
    scheduler.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_the_trainer_readers(tmp_path):
    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((seam.attached_trainer(pl_module) is trainer, seam.logs_written_this_step(trainer),
                         seam.is_last_batch(trainer), seam.is_compiled(pl_module)))

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []
    loader = DataLoader(TensorDataset(torch.ones(3, 1)), batch_size=1)
    trainer = pl.Trainer(max_epochs=1, callbacks=[Probe()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
                         default_root_dir=tmp_path)
    module = Tiny()
    trainer.fit(module, loader)
    assert seam.attached_trainer(Tiny()) is None
    assert [s[0] for s in seen] == [True] * 3 and [s[2] for s in seen] == [False, False, True]
    assert [s[1] for s in seen] == [False, True, False]  # every log_every_n_steps=2 steps
    assert not any(s[3] for s in seen)


def test_step_watch_says_each_optimizer_step_once():
    watch, trainer = StepWatch(), type("T", (), {"global_step": 0})()
    assert watch.stepped(trainer) and not watch.stepped(trainer)
    trainer.global_step = 1
    assert watch.stepped(trainer) and watch.last == 1


def test_the_protocols_find_their_implementers():
    optimizer = GaLoreAdamW([nn.Parameter(torch.zeros(3, 3))])
    assert isinstance(optimizer, RestartableState) and isinstance(optimizer, PerParameterOptions)
    assert isinstance(InfoBatch(), ShortensEpochs)
    plain = torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    assert not isinstance(plain, RestartableState) and not isinstance(plain, PerParameterOptions)
