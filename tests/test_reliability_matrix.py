"""The reliability matrix (Composer's pattern): every callback, and the examples' main-job
combinations of them (``tests/techniques.py``), through the same checks —

* resume: 20 steps straight vs 7 steps, checkpoint, resume to 20: weights, optimizer state and
  every callback's state bit for bit; every checkpoint loads with ``weights_only=True``;
* a SIGTERM mid-fit (Lightning's fault-tolerant path: ``OnExceptionCheckpoint``), then resume: the
  same as the uninterrupted run;
* bf16 autocast on CPU and gradient accumulation 2 train, with each technique's invariant kept;
* strategies that shard or wrap parameters (FSDP1, DeepSpeed; FSDP2 where unsupported) refused in
  ``setup`` (needing whole weights, or untested there);
* LightningCLI: ``--print_config`` of every callback re-runs;
* bad input: every argument of every callback has an invalid value that raises a ValueError naming it.

DDP: per technique in ``tests/*/test_*_ddp.py``; the combinations in ``test_combinations_ddp.py``.
"""

import inspect
import os
import re
import signal

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

import lit_efficient
from lit_efficient.cli import main
from lit_efficient.continual.metrics import AccuracyMatrix
from lit_efficient.core.callback import EfficientCallback
from lit_efficient.sparsity.callback import SparseTrainingCallback
from lit_efficient.sparsity.nm import NMSparsity, nm_group_dim, nm_mask
from tests.sparsity.sparse_helpers import MLP, loader
from tests.techniques import ENTRIES

# -- resume ---------------------------------------------------------------------------------------


def run(tmp_path, name, ckpt=None, extra=(), **kwargs):
    pl.seed_everything(0)
    model, callbacks = MLP(), ENTRIES[name]()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=7, save_top_k=-1, save_on_train_epoch_end=True)
    kwargs.setdefault("max_epochs", 20)
    trainer = pl.Trainer(callbacks=[*callbacks, saver, *extra], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, loader(n=16, batch=16), ckpt_path=ckpt)  # one-batch epochs: the data order restores exactly
    return model, callbacks, trainer


def assert_same_run(straight, resumed, checkpoint=None):
    (a_model, a_callbacks, a_trainer), (b_model, b_callbacks, b_trainer) = straight, resumed
    assert a_trainer.global_step == b_trainer.global_step
    for (key, a), b in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(a, b), key
    a_opt, b_opt = a_trainer.optimizers[0].state_dict(), b_trainer.optimizers[0].state_dict()
    assert [g["params"] for g in a_opt["param_groups"]] == [g["params"] for g in b_opt["param_groups"]]
    for index, values in a_opt["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b_opt["state"][index][key])), (index, key)
    for a_callback, b_callback in zip(a_callbacks, b_callbacks):
        a_state, b_state = a_callback.state_dict(), b_callback.state_dict()
        if checkpoint is not None:
            saved = checkpoint["callbacks"].get(a_callback.state_key, {})
            assert a_state.keys() == saved.keys(), type(a_callback).__name__
        assert_same_state(a_state, b_state, type(a_callback).__name__)


def assert_same_state(a, b, where=""):
    """Equal plain values, and bit-identical tensors, inside dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_resume_matches_the_uninterrupted_run(tmp_path, name):
    straight = run(tmp_path, name)
    ckpt = tmp_path / "ckpts" / "epoch=6-step=7.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    for other in (tmp_path / "ckpts").glob("*.ckpt"):
        torch.load(other, weights_only=True)
    assert_same_run(straight, run(tmp_path, name, ckpt=str(ckpt)), checkpoint)


def test_the_infobatch_resume_case_really_prunes(tmp_path):
    _, (infobatch,), _ = run(tmp_path, "infobatch")
    assert infobatch.samples_forwarded - infobatch.order.numel() < 20 * 16  # it did prune


class SigtermAt(Callback):
    """Sends this process a SIGTERM at the end of optimizer step ``step``, as a cluster's pre-emption would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("name", ["vit_main_job", "lm_main_job", "ddpm_main_job"])
def test_sigterm_mid_fit_then_resume_loses_nothing(tmp_path, name):
    straight = run(tmp_path / "straight", name)
    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "preempted")
    with pytest.raises(SystemExit):  # Lightning finishes the step, saves through on_exception, exits
        run(tmp_path / "killed", name, extra=[SigtermAt(9), on_exception])
    ckpt = tmp_path / "preempted" / "on_exception.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 9
    assert_same_run(straight, run(tmp_path / "resumed", name, ckpt=str(ckpt)))


# -- precision and accumulation -------------------------------------------------------------------


def assert_invariants(callbacks, model):
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for callback in callbacks:
        if isinstance(callback, SparseTrainingCallback):
            assert callback.masks.is_applied() and callback.masks.sparsity() > 0.5
        if isinstance(callback, NMSparsity):  # written into the weights at the end of fit
            for t in callback.targets:
                allowed = nm_mask(t.param, callback.n, callback.m, nm_group_dim(t))
                assert torch.equal(t.param != 0, (t.param != 0) & allowed)


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_bf16_autocast_on_cpu(tmp_path, name):
    pl.seed_everything(0)
    model, callbacks = MLP(), ENTRIES[name]()
    trainer = pl.Trainer(max_epochs=12, precision="bf16-mixed", callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, loader(n=16, batch=16))
    assert trainer.global_step == 12
    assert_invariants(callbacks, model)


@pytest.mark.parametrize("name", sorted(n for n in ENTRIES if n != "nm"))  # N:M: tests/sparsity/test_nm.py
def test_gradient_accumulation_counts_optimizer_steps(tmp_path, name):
    pl.seed_everything(0)
    model, callbacks = MLP(), ENTRIES[name]()
    trainer = pl.Trainer(max_epochs=12, accumulate_grad_batches=2, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, loader(n=32, batch=16))  # two micro-batches, one optimizer step per full epoch
    assert 6 <= trainer.global_step <= 12
    assert_invariants(callbacks, model)
    for callback in callbacks:
        if isinstance(callback, SparseTrainingCallback):  # schedules count optimizer steps, not batches
            assert callback.last_applied_step == trainer.global_step


# -- strategies -----------------------------------------------------------------------------------

REFUSED_SHARDED = ["GraNet", "RigL", "SET", "NMSparsity", "SparCL", "ProgressiveFreezing", "FreezeOut", "AutoFreeze",
                   "LinearFreezing", "GaLore", "LossReweighting", "InfoBatch"]  # every callback
# through ModelParallelStrategy: tests/test_fsdp2*.py, tests/sparsity/test_sparcl_fsdp2.py
FSDP2_SUPPORTED = {"LossReweighting", "InfoBatch", "ProgressiveFreezing", "FreezeOut", "AutoFreeze", "GaLore",
                   "LinearFreezing", "GraNet", "RigL", "SET", "NMSparsity", "SparCL"}


class _StubTrainer:
    def __init__(self, strategy):
        self.strategy = strategy
        self.callbacks = []


class _StubMesh:
    def __init__(self, tensor_parallel):
        self.sizes = {"data_parallel": 2, "tensor_parallel": tensor_parallel}

    def __getitem__(self, name):
        size = self.sizes[name]
        return type("Dim", (), {"size": lambda self: size})()


def model_parallel(tensor_parallel):
    strategy = object.__new__(ModelParallelStrategy)  # no processes: only the mesh sizes are read
    strategy._device_mesh = _StubMesh(tensor_parallel)
    return strategy


@pytest.mark.parametrize("strategy", [FSDPStrategy(), object.__new__(DeepSpeedStrategy), "fsdp2"],
                         ids=["fsdp", "deepspeed", "fsdp2"])
@pytest.mark.parametrize("name", REFUSED_SHARDED)
def test_sharding_strategies_are_refused_in_setup(name, strategy):
    """FSDP1 and DeepSpeed are refused by every callback, naming FSDP2 where the callback supports it;
    FSDP2 (ModelParallelStrategy) by the callbacks that do not support it yet."""
    if strategy == "fsdp2":
        if name in FSDP2_SUPPORTED:
            pytest.skip("supported: tests/test_fsdp2.py")
        strategy = model_parallel(1)
    callback = getattr(lit_efficient, name)()
    supported = "single-device, DDP and FSDP2 training (ModelParallelStrategy" if name in FSDP2_SUPPORTED \
        else "single-device and DDP training;"
    with pytest.raises(RuntimeError, match=rf"{name} supports {re.escape(supported)}.*{type(strategy).__name__}"):
        callback.setup(_StubTrainer(strategy), MLP(), "fit")


@pytest.mark.parametrize("name", sorted(FSDP2_SUPPORTED))
def test_fsdp2_with_tensor_parallelism_is_refused(name):
    with pytest.raises(RuntimeError, match="tensor_parallel_size must be 1, got 2"):
        getattr(lit_efficient, name)().setup(_StubTrainer(model_parallel(2)), MLP(), "fit")


# -- LightningCLI ---------------------------------------------------------------------------------

CLI_ARGS = {  # sized for cli_models.TinyRegressor (Linear 4→8→1)
    "GraNet": {"sparsity": 0.5, "update_every": "2st"},
    "RigL": {"sparsity": 0.5, "update_every": "2st"},
    "SET": {"sparsity": 0.5, "update_every": "2st"},
    "NMSparsity": {"n": 2, "m": 4},
    "ProgressiveFreezing": {"schedule": "linear", "freeze_start": 0.2, "freeze_level": 0.5,
                            "blocks": ["net.0", "net.2"]},
    "FreezeOut": {"t0": 0.5, "warp": "linear", "blocks": ["net.0"]},  # the head (net.2) keeps training
    "AutoFreeze": {"freeze_start": "4st", "check_every": "2st", "percentile": 90.0, "freeze_level": 0.5,
                   "blocks": ["net.0", "net.2"]},
    "LinearFreezing": {"freeze_start": 0.2, "freeze_level": 0.5, "blocks": ["net.0", "net.2"]},
    "LossReweighting": {"strategy": "quadratic", "warmup": "1st"},
    "InfoBatch": {"prune_ratio": 0.3},
    "GaLore": {"rank": 2, "update_proj_gap": 2},
}


@pytest.mark.parametrize("name", sorted(CLI_ARGS))
def test_print_config_of_every_callback_re_runs(tmp_path, capsys, name):
    # SparCL needs a continual datamodule: its round trip is in tests/examples/test_vision_examples.py
    model = {"class_path": "cli_models.TinyRegressor",
             "init_args": {"optimizer": "adamw" if name == "GaLore" else "sgd"}}
    config = {"model": model, "data": {"class_path": "cli_models.TinyData"},
              "trainer": {"max_epochs": 2, "limit_val_batches": 1, "logger": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "default_root_dir": str(tmp_path),
                          "callbacks": [{"class_path": f"lit_efficient.{name}", "init_args": CLI_ARGS[name]}]}}
    written = tmp_path / "written.yaml"
    written.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(written), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    (entry,) = yaml.safe_load(printed.read_text())["trainer"]["callbacks"]
    assert entry["class_path"] == f"lit_efficient.{name}"
    assert all(entry["init_args"][k] == v for k, v in CLI_ARGS[name].items())
    cli = main(["fit", "--config", str(printed)])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, EfficientCallback)]
    assert type(callback).__name__ == name and cli.trainer.global_step == 16


# -- bad input ------------------------------------------------------------------------------------

BAD = {  # one invalid value for every constructor argument
    "GraNet": dict(sparsity=1.0, initial_density=0.0, prune_start="soon", prune_end="1.5dur", update_every="0st",
                   regrow_fraction=1.5, final_regrow_fraction=-0.1, growth="magic", distribution="normal", include=[""],
                   exclude=[3], seed="zero", progress_bar="yes"),
    "RigL": dict(sparsity=-0.1, update_every="x", drop_fraction=1.0, stop="2 weeks", drop_schedule="linear",
                 distribution="erk2", include=[""], exclude=[""], seed=1.5, progress_bar="yes"),
    "SET": dict(sparsity=1.2, update_every=0, drop_fraction=-0.5, stop=-1, drop_schedule="cos", distribution="",
                include=[None], exclude=[""], seed=None, progress_bar="yes"),
    "NMSparsity": dict(n=0, m=2.5, decay=-1.0, include=[""], exclude=[1], export_semi_structured="yes",
                          progress_bar="yes"),
    "SparCL": dict(sparsity=1.0, tdm="yes", dgm=1, ddr=None, gradient_sparsity=1.0, removal_fraction=-0.1,
                   mask_update_every=0.0, mask_fixed_from=1.5, score_lambda=-1, explore_fraction=1.0,
                   gradient_mask_every=0, removal_points=[0.0], include=[""], exclude=[2], seed="a",
                   progress_bar="yes"),
    "ProgressiveFreezing": dict(schedule="sometimes", t0=0.0, warp="quartic", freeze_start="later", freeze_level=0.0,
                                check_every="0st", percentile=0.0, blocks=[""], frozen_eval="no",
                                tied_embeddings="share", lr_annealing="on", cache_frozen_mb=-1.0, progress_bar="yes"),
    "FreezeOut": dict(t0=0.0, warp="quartic", lr_annealing="on", blocks=[""], frozen_eval="no", tied_embeddings="share",
                      cache_frozen_mb=-1.0, progress_bar="yes"),
    "AutoFreeze": dict(freeze_start="later", freeze_level=0.0, check_every="0st", percentile=0.0, blocks=[""],
                       frozen_eval="no", tied_embeddings="share", cache_frozen_mb=-1.0, progress_bar="yes"),
    "LinearFreezing": dict(freeze_start="later", freeze_level=0.0, blocks=[""], frozen_eval="no",
                           tied_embeddings="share", cache_frozen_mb=-1.0, progress_bar="yes"),
    "LossReweighting": dict(strategy="top", temperature=0.0, warmup="eventually", timestep_buckets=-1, timestep_key="",
                            num_timesteps=0, progress_bar="yes"),
    "InfoBatch": dict(prune_ratio=1.0, delta=0.0, shuffle="yes", seed=0.5, progress_bar="yes"),
    "GaLore": dict(rank=0, update_proj_gap=0, scale=0.0, proj_type="diagonal", projection="qr", include=[""],
                   target_modules=[""], exclude=[""], fira="yes", eight_bit="no", layerwise=1, seed="s",
                   moments_on_refresh="reset", shard_basis="yes", progress_bar="yes"),
    "AccuracyMatrix": dict(keys=[]),
}


def callback_class(name):
    return AccuracyMatrix if name == "AccuracyMatrix" else getattr(lit_efficient, name)


def test_every_callback_and_every_argument_has_a_bad_input_case():
    # the strategy takes DDPStrategy's arguments: its own refusals are in tests/strategies
    public = [n for n in lit_efficient.__all__ if n not in ("GaLoreAdamW", "ExactCompressionDDPStrategy")]
    assert sorted(BAD) == sorted([*public, "AccuracyMatrix"])
    for name, cases in BAD.items():
        arguments = list(inspect.signature(callback_class(name).__init__).parameters)[1:]
        assert sorted(cases) == sorted(arguments), name


@pytest.mark.parametrize("name,argument", [(n, a) for n, cases in BAD.items() for a in cases])
def test_bad_input_raises_a_value_error_naming_the_argument(name, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        callback_class(name)(**{argument: BAD[name][argument]})



# -- torch.compile --------------------------------------------------------------------------------


# one entry per way of touching the model: masks after the step (rigl), forward hooks that swap
# weights (nm), no-grad prefixes and post-step annealing (freezing), a converted optimizer (galore),
# a wrapped training_step and a planned loader (loss_reweighting, infobatch), and a mix of them
COMPILED = ["rigl", "nm", "freezeout_lr_annealing", "freezeout_cached", "galore", "loss_reweighting", "infobatch",
            "vit_main_job"]


@pytest.mark.parametrize("name", COMPILED)
def test_torch_compile_gives_the_eager_result(tmp_path, name):
    def train(compiled):
        pl.seed_everything(0)
        model, callbacks = MLP(), ENTRIES[name]()
        if compiled:  # aot_eager: dynamo and autograd tracing without a C++ toolchain
            model.net = torch.compile(model.net, backend="aot_eager")
        trainer = pl.Trainer(max_epochs=12, callbacks=callbacks, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                             default_root_dir=tmp_path)
        trainer.fit(model, loader(n=16, batch=16))
        assert_invariants(callbacks, model)
        return [p.detach() for p in model.parameters()]

    torch._dynamo.reset()
    for eager, compiled in zip(train(False), train(True)):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# -- SparCL (it needs a continual datamodule: Split-digits, 2 tasks of 3 epochs) ------------------


@pytest.mark.parametrize("mode", ["bf16", "accumulation", "compile"])
def test_sparcl_under_bf16_accumulation_and_compile(tmp_path, mode):
    from examples.vision.continual import ContinualClassifier, SplitDigits
    from lit_efficient import SparCL

    def train(mode):
        pl.seed_everything(0)
        model = ContinualClassifier(method="derpp", buffer_size=50, width=8)
        if mode == "compile":
            model.model = torch.compile(model.model, backend="aot_eager")
        sparcl = SparCL(sparsity=0.75, mask_update_every=0.4, removal_points=[0.4], gradient_mask_every=2)
        options = {"bf16": dict(precision="bf16-mixed"), "accumulation": dict(accumulate_grad_batches=2)}.get(mode, {})
        trainer = pl.Trainer(max_epochs=6, callbacks=[sparcl], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, deterministic=True, default_root_dir=tmp_path, **options)
        trainer.fit(model, datamodule=SplitDigits(num_tasks=2, epochs_per_task=3, batch_size=64))
        assert sparcl.masks.is_applied() and sparcl.masks.sparsity() == pytest.approx(0.75, abs=1e-3)
        assert sparcl.removed_total > 0 and sparcl.task == 1
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        return [p.detach() for p in model.parameters()]

    result = train(mode)
    if mode == "compile":
        torch._dynamo.reset()
        for compiled, eager in zip(result, train("eager")):
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
