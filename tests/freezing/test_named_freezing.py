"""The named freezing callbacks (FreezeOut, AutoFreeze, LinearFreezing) against the
``ProgressiveFreezing`` umbrella: the same runs bit for bit, one checkpoint format, only their own
arguments, each checked by name."""

import copy
import inspect
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lit_efficient import AutoFreeze, FreezeOut, LinearFreezing, ProgressiveFreezing
from lit_efficient.freezing.base import BlockFreezing
from tests.freezing.test_progressive import ViTModule, image_loader, make_trainer

# a case: the named callback, and arguments that mean the same to it and to ProgressiveFreezing
PAIRS = {
    "freezeout": (FreezeOut, dict(t0=0.3, warp="linear")),
    "freezeout_annealed": (FreezeOut, dict(t0=0.3, warp="linear", lr_annealing=True)),
    "linear": (LinearFreezing, dict(freeze_start=0.25, freeze_level=0.75)),
    "adaptive": (AutoFreeze, dict(freeze_start="1st", check_every="1st", percentile=75, freeze_level=0.75)),
}
SCHEDULE = {FreezeOut: "freezeout", LinearFreezing: "linear", AutoFreeze: "adaptive"}
STATE_KEYS = {"frozen", "previous_norms", "pending", "frozen_param_steps", "counted_steps", "last_step",
              "check_deferred", "joined_modules", "joined_params", "freed_state_bytes", "freeze_positions"}
COMMON = ["blocks", "frozen_eval", "tied_embeddings", "cache_frozen_mb", "progress_bar"]


def umbrella(named, kwargs):
    return ProgressiveFreezing(schedule=SCHEDULE[named], **kwargs)


def fit(callback, tmp_path, ckpt=None):
    """Six one-batch epochs, a checkpoint after the third; no dropout (Lightning does not restore
    the RNG dropout draws from)."""
    pl.seed_everything(0, verbose=False)
    module = ViTModule(drop_rate=0.0)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=3, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, [callback, saver], -1, max_epochs=6, deterministic=True, enable_checkpointing=True)
    trainer.fit(module, image_loader(n=8, batch=8), ckpt_path=ckpt)
    return module


def saved_state(tmp_path):
    return torch.load(tmp_path / "ckpts" / "epoch=2-step=3.ckpt", weights_only=True)["callbacks"]["ProgressiveFreezing"]


def assert_same_run(a_module, a, b_module, b):
    assert a.frozen == b.frozen and a.frozen_fraction() == b.frozen_fraction()
    assert a.state_dict() == b.state_dict()
    for (name, x), y in zip(a_module.state_dict().items(), b_module.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("case", sorted(PAIRS))
def test_named_callback_trains_bit_identical_to_progressive_freezing_and_shares_its_checkpoints(tmp_path, case):
    named, kwargs = PAIRS[case]
    old, new = umbrella(named, kwargs), named(**kwargs)
    assert isinstance(old, named) and type(old).__name__ == "ProgressiveFreezing"
    straight = fit(old, tmp_path / "umbrella")
    assert saved_state(tmp_path / "umbrella")["frozen"] < old.frozen  # it froze after the checkpoint
    assert_same_run(straight, old, fit(new, tmp_path / "named"), new)

    # the named callback writes the same checkpoint state (one key, one format), and resumes from the
    # umbrella's bit for bit
    state = saved_state(tmp_path / "umbrella")
    assert set(state) == STATE_KEYS and saved_state(tmp_path / "named") == state
    if named is AutoFreeze:
        assert state["previous_norms"]
    fresh = named(**kwargs)
    fresh.load_state_dict(copy.deepcopy(state))
    assert fresh.state_dict() == state
    if case in ("freezeout_annealed", "linear"):
        return  # resuming is the base class's: once for a rule on the run's position, once on gradients
    resumed, ckpt = named(**kwargs), tmp_path / "umbrella" / "ckpts" / "epoch=2-step=3.ckpt"
    assert_same_run(straight, old, fit(resumed, tmp_path / "resumed", ckpt=str(ckpt)), resumed)


# -- arguments ------------------------------------------------------------------------------------
BAD = {
    FreezeOut: dict(t0=0.0, warp="quartic", lr_annealing="on"),
    AutoFreeze: dict(freeze_start="later", freeze_level=0.0, check_every="0st", percentile=0.0),
    LinearFreezing: dict(freeze_start="soon", freeze_level=1.5),
}
BAD_COMMON = dict(blocks=[""], frozen_eval="no", tied_embeddings="share", cache_frozen_mb=-1.0,
                  progress_bar="yes")


@pytest.mark.parametrize("named,argument", [(n, a) for n, cases in BAD.items() for a in [*cases, *BAD_COMMON]])
def test_bad_arguments_name_the_argument(named, argument):
    value = {**BAD[named], **BAD_COMMON}[argument]
    with pytest.raises(ValueError, match=f"`{argument}`"):
        named(**{argument: value})


def test_every_argument_has_a_bad_case_and_only_its_own_arguments():
    for named, own in BAD.items():
        arguments = list(inspect.signature(named).parameters)
        assert arguments == [*own, *COMMON], named.__name__
    assert not {"percentile", "check_every", "freeze_start", "freeze_level", "schedule"} & set(
        inspect.signature(FreezeOut).parameters)
    assert not {"t0", "warp", "lr_annealing", "schedule"} & set(inspect.signature(AutoFreeze).parameters)
    assert not {"t0", "warp", "lr_annealing", "check_every", "percentile"} & set(
        inspect.signature(LinearFreezing).parameters)
    # the umbrella keeps all thirteen, in the order configs know (progress_bar came last)
    assert list(inspect.signature(ProgressiveFreezing).parameters) == [
        "schedule", "t0", "warp", "freeze_start", "freeze_level", "check_every", "percentile", "blocks",
        "frozen_eval", "tied_embeddings", "lr_annealing", "cache_frozen_mb", "progress_bar"]


def test_cache_needs_frozen_eval():
    with pytest.raises(ValueError, match="`cache_frozen_mb` needs frozen_eval=True"):
        LinearFreezing(cache_frozen_mb=8, frozen_eval=False)


def test_named_defaults_are_the_umbrellas():
    for named, schedule in SCHEDULE.items():
        pf, plain = ProgressiveFreezing(schedule=schedule), named()
        for name in inspect.signature(named).parameters:
            assert getattr(pf, name, None) == getattr(plain, name, None), (named.__name__, name)


@pytest.mark.parametrize("schedule", ["freezeout", "linear", "adaptive"])
def test_progressive_freezing_is_the_named_callback_and_pickles(schedule):
    pf = ProgressiveFreezing(schedule=schedule, t0=0.5, percentile=60)
    named = {"freezeout": FreezeOut, "linear": LinearFreezing, "adaptive": AutoFreeze}[schedule]
    assert isinstance(pf, named) and isinstance(pf, ProgressiveFreezing) and isinstance(pf, BlockFreezing)
    assert type(pf).__name__ == type(pf).__qualname__ == "ProgressiveFreezing" and pf.technique == "freezing"
    assert pf.t0 == 0.5 and pf.percentile == 60 and pf.schedule == schedule  # every argument stays readable
    for clone in (pickle.loads(pickle.dumps(pf)), copy.deepcopy(pf)):  # DDP spawn pickles callbacks
        assert type(clone) is type(pf) and clone.schedule == schedule and clone.percentile == 60


def test_a_subclass_of_progressive_freezing_keeps_its_overrides():
    class Mine(ProgressiveFreezing):
        def frozen_at(self, step):
            return 1

    mine = Mine(schedule="linear")
    assert isinstance(mine, Mine) and isinstance(mine, LinearFreezing) and type(mine).__name__ == "Mine"
    assert mine.frozen_at(0) == 1


def test_two_freezers_in_one_trainer_are_refused(tmp_path):
    # one checkpoint key for every freezer: Lightning refuses two stateful callbacks sharing it
    with pytest.raises(RuntimeError, match="state_key"):
        make_trainer(tmp_path, [FreezeOut(), AutoFreeze()], 2)


class Endless(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.rand(1, 8, 8, generator=g), torch.tensor(0)


class StopAt(pl.Callback):
    """Ends an open-ended run (no max_steps, no max_epochs: the length is unknown) after ``steps``."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.steps


def open_ended(tmp_path, callback, steps):
    trainer = make_trainer(tmp_path, [callback, StopAt(steps)], -1, max_epochs=-1)
    trainer.fit(ViTModule(), DataLoader(Endless(), batch_size=4))


@pytest.mark.parametrize("callback,message", [(FreezeOut(), "FreezeOut needs a known run length"),
                                              # as it always did: its default freeze_start fails first
                                              (ProgressiveFreezing(), "`freeze_start` is a fraction of the run")])
def test_schedules_on_the_run_length_need_one(tmp_path, callback, message):
    with pytest.raises(ValueError, match=message):
        open_ended(tmp_path, callback, 1)


def test_auto_freeze_needs_no_run_length(tmp_path):
    freezing = AutoFreeze(freeze_start="1st", check_every="1st", percentile=100)
    open_ended(tmp_path, freezing, 4)
    assert freezing.counted_steps == 4 and freezing.previous_norms


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("class_path,init_args,named", [
    ("lit_efficient.ProgressiveFreezing", {"schedule": "adaptive", "check_every": "2st", "percentile": 75}, AutoFreeze),
    ("lit_efficient.FreezeOut", {"t0": 0.5, "warp": "linear"}, FreezeOut),
    ("lit_efficient.LinearFreezing", {"freeze_start": 0.2}, LinearFreezing),
])
def test_lightning_cli_builds_them_from_a_config(tmp_path, class_path, init_args, named):
    from lightning.pytorch.cli import LightningCLI

    trainer_args = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path), "max_steps": 2,
                    "callbacks": [{"class_path": class_path, "init_args": init_args}]}
    cli = LightningCLI(ViTModule, run=False, save_config_callback=None, args={"trainer": trainer_args})
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, BlockFreezing)]
    assert isinstance(callback, named)
    expected = type(callback)(**init_args)  # the arguments as the class itself parses them
    assert all(getattr(callback, k) == getattr(expected, k) for k in init_args)


def test_lightning_cli_refuses_an_argument_of_another_schedule(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI

    trainer_args = {"logger": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lit_efficient.FreezeOut", "init_args": {"percentile": 75}}]}
    with pytest.raises(SystemExit):
        LightningCLI(ViTModule, run=False, save_config_callback=None, args={"trainer": trainer_args})
    assert "percentile" in capsys.readouterr().err
