"""Tests of the vision examples: data split, the per-sample loss contract, real learning with
no callback, and every yaml config run through the ``lit-efficient`` CLI."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from examples.vision.data import DigitsDataModule
from examples.vision.diffusion import DDPMDigits
from examples.vision.vit import ViTClassifier
from lit_efficient.cli import main

VISION = Path(__file__).resolve().parents[2] / "examples" / "vision"
QUICK = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
         "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]


def test_digits_split_is_the_baseline_split():
    dm = DigitsDataModule()
    dm.setup()
    assert len(dm.train_set) == 1437 and len(dm.val_set) == 360
    x, y = dm.train_set.tensors
    assert x.shape[1:] == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    again = DigitsDataModule()
    again.setup()
    assert torch.equal(again.train_set.tensors[0], x)
    big = DigitsDataModule(image_size=32)
    big.setup()
    assert big.val_set.tensors[0].shape[1:] == (1, 32, 32)
    pair = DigitsDataModule(classes=[3, 7])
    pair.setup()
    assert set(pair.train_set.tensors[1].tolist()) == {3, 7}


def test_train_loader_order_is_seeded():
    def labels(seed):
        return torch.cat([y for _, y in DigitsDataModule(seed=seed).train_dataloader()])

    first = labels(0)
    assert torch.equal(first, labels(0)) and not torch.equal(first, labels(1))
    assert len(DigitsDataModule().train_dataloader()) == 23  # 40 epochs = the baseline's 920 steps


@pytest.mark.parametrize("config", ["vit_digits.yaml", "vit32_digits.yaml", "ddpm_digits.yaml"])
def test_configs_run_through_the_cli(tmp_path, capsys, config):
    # Run from the config LightningCLI prints, so every init argument round-trips as plain yaml.
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(VISION / config), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cli = main(["fit", "--config", str(printed), f"--trainer.default_root_dir={tmp_path}", *QUICK])
    assert cli.trainer.global_step == 2
    written = yaml.safe_load((VISION / config).read_text())
    for key, value in written["model"]["init_args"].items():
        assert cli.model.hparams[key] == value, key


def _first_batch():
    dm = DigitsDataModule(batch_size=16)
    dm.setup()
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("module", [ViTClassifier(depth=1), DDPMDigits(channels=[8, 16])], ids=["vit", "ddpm"])
def test_training_step_returns_per_sample_losses(module):
    out = module.training_step(_first_batch(), 0)
    assert out["sample_losses"].shape == (16,)
    assert torch.allclose(out["loss"], out["sample_losses"].mean())
    if isinstance(module, DDPMDigits):
        assert out["timesteps"].shape == (16,)


def test_vit_learns_digits_without_callbacks(tmp_path):
    pl.seed_everything(0)
    model = ViTClassifier()
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule())
    # chance is 10% and the ViT sits at ln(10) loss for its first few epochs; ten epochs (230 steps)
    # measured 82% here
    assert trainer.callback_metrics["val/acc"] > 0.6


def test_ddpm_loss_decreases(tmp_path):
    pl.seed_everything(0)
    model = DDPMDigits(channels=[16, 32])
    dm = DigitsDataModule()
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    generator_state = torch.Generator().manual_seed(0).get_state()

    def fixed_loss():
        g = torch.Generator()
        g.set_state(generator_state)
        with torch.no_grad():
            return float(model.noise_losses(batch[0], generator=g)[0].mean())

    before = fixed_loss()
    trainer = pl.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert fixed_loss() < 0.6 * before


def test_ddpm_validation_noise_is_fixed_and_samples_reach_tensorboard(tmp_path):
    pl.seed_everything(0)
    model = DDPMDigits(channels=[8, 16], sample_every_n_epochs=1, num_inference_steps=2)
    dm = DigitsDataModule()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, num_sanity_val_steps=0,
                         logger=TensorBoardLogger(tmp_path, name="ddpm"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    # same noise and timesteps every validation: equal weights give an equal val/loss
    first = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    assert trainer.validate(model, dm, verbose=False)[0]["val/loss"] == first
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    assert "samples" in events.Tags()["images"]


@pytest.mark.parametrize("overlay", sorted(p.name for p in (VISION / "sparse").glob("*.yaml")))
def test_sparse_overlays_train_the_vit(tmp_path, overlay):
    from lit_efficient.sparsity.callback import SparseTrainingCallback
    from lit_efficient.sparsity.nm import NMSparsity

    cli = main(["fit", "--config", str(VISION / "vit_digits.yaml"), "--config", str(VISION / "sparse" / overlay),
                f"--trainer.default_root_dir={tmp_path}", *QUICK])
    (sparse,) = [c for c in cli.trainer.callbacks if isinstance(c, (SparseTrainingCallback, NMSparsity))]
    names = [t.name for t in sparse.targets] if isinstance(sparse, NMSparsity) else sparse.masks.names()
    assert len(names) == 16 and all(".blocks." in f".{n}." for n in names)
    if isinstance(sparse, SparseTrainingCallback):
        assert sparse.masks.sparsity() == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("base", ["vit32_digits.yaml", "ddpm_digits.yaml"])
@pytest.mark.parametrize("overlay", sorted(p.name for p in (VISION / "freezing").glob("*.yaml")))
def test_freezing_overlays(tmp_path, base, overlay):
    from lit_efficient import ProgressiveFreezing

    cli = main(["fit", "--config", str(VISION / base), "--config", str(VISION / "freezing" / overlay),
                f"--trainer.default_root_dir={tmp_path}", *QUICK])
    (freezing,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressiveFreezing)]
    assert len(freezing.blocks) >= 2 and cli.trainer.global_step == 2


@pytest.mark.parametrize("base,overlay", [("vit_digits.yaml", "loss_reweighting.yaml"),
                                          ("vit_digits.yaml", "infobatch.yaml"),
                                          ("ddpm_digits.yaml", "loss_reweighting_ddpm.yaml"),
                                          ("ddpm_digits.yaml", "infobatch.yaml")])
def test_reweighting_overlays(tmp_path, base, overlay):
    from lit_efficient import InfoBatch, LossReweighting

    cli = main(["fit", "--config", str(VISION / base), "--config", str(VISION / "reweighting" / overlay),
                f"--trainer.default_root_dir={tmp_path}", *QUICK])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, (InfoBatch, LossReweighting))]
    assert cli.trainer.global_step == 2 and math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    if isinstance(callback, InfoBatch):
        assert callback.num_samples == 1437 and callback.shuffle is True
    elif "ddpm" in base:
        assert callback.timestep_buckets == 10


def test_galore_overlay_trains_the_vit(tmp_path):
    from lit_efficient import GaLore, GaLoreAdamW

    cli = main(["fit", "--config", str(VISION / "vit_digits.yaml"), "--config", str(VISION / "galore" / "galore.yaml"),
                f"--trainer.default_root_dir={tmp_path}", *QUICK])
    (galore,) = [c for c in cli.trainer.callbacks if isinstance(c, GaLore)]
    assert isinstance(cli.trainer.optimizers[0], GaLoreAdamW)
    assert len(galore.targets) == 16 and all(".blocks." in f".{t.name}." for t in galore.targets)


def test_continual_config_round_trips_and_the_sparcl_overlay_trains(tmp_path, capsys):
    from lit_efficient import SparCL
    from lit_efficient.continual.metrics import AccuracyMatrix

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(VISION / "continual_digits.yaml"), "--config",
              str(VISION / "sparcl" / "sparcl.yaml"), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cli = main(["fit", "--config", str(printed), f"--trainer.default_root_dir={tmp_path}", *QUICK])
    assert cli.trainer.global_step == 2
    (sparcl,) = [c for c in cli.trainer.callbacks if isinstance(c, SparCL)]
    assert any(isinstance(c, AccuracyMatrix) for c in cli.trainer.callbacks)
    assert sparcl.masks.names() == ["model.conv1", "model.conv2", "model.fc"]  # stem and head stay dense
    assert sparcl.masks.sparsity() == pytest.approx(0.9, abs=1e-3) and sparcl.num_samples == 295
    assert cli.datamodule.epochs_per_task == 50 and cli.trainer.max_epochs == 250  # the paper's 50-epoch tasks


@pytest.mark.parametrize("base", ["vit_digits.yaml", "ddpm_digits.yaml"])
def test_combined_main_jobs_round_trip_and_train(tmp_path, capsys, base):
    from lit_efficient.core.callback import EfficientCallback

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(VISION / base), "--config", str(VISION / "combined" / base), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    cli = main(["fit", "--config", str(printed), f"--trainer.default_root_dir={tmp_path}", *QUICK])
    ours = [type(c).__name__ for c in cli.trainer.callbacks if isinstance(c, EfficientCallback)]
    written = yaml.safe_load((VISION / "combined" / base).read_text())["trainer"]["callbacks"]
    assert ours == [c["class_path"].split(".")[-1] for c in written] and len(ours) == 3
    assert cli.trainer.global_step == 2 and math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
