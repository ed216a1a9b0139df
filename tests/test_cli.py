import os
import shutil
import subprocess

import pytest
import yaml

from lit_efficient.cli import main

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def base_args(tmp_path, steps=3):
    return ["--model", "cli_models.TinyRegressor", "--data", "cli_models.TinyData", f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", *QUIET]


def test_fit_any_module_by_class_path(tmp_path):
    cli = main(["fit", *base_args(tmp_path), "--model.hidden=5"])
    assert cli.trainer.global_step == 3
    assert cli.model.net[0].out_features == 5


def test_print_config_round_trip(tmp_path, capsys):
    args = ["fit", *base_args(tmp_path, steps=8), "--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
            "--trainer.callbacks.monitor=val/loss", "--trainer.callbacks.patience=7", "--model.lr=0.01"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    config = tmp_path / "config.yaml"
    config.write_text(printed)
    parsed = yaml.safe_load(printed)
    assert parsed["trainer"]["callbacks"][0]["class_path"] == "lightning.pytorch.callbacks.EarlyStopping"
    cli = main(["fit", "--config", str(config)])
    assert cli.trainer.global_step == 8 and cli.model.hparams.lr == 0.01
    assert [c.patience for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping"] == [7]


def test_unknown_config_key_is_refused_before_training(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "cli_models.TinyRegressor",
                                                "init_args": {"hiden": 4}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *base_args(tmp_path)[4:]])
    assert exit_info.value.code != 0
    assert "hiden" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "checkpoints")


def test_console_entry_point_imports_from_the_working_directory(tmp_path):
    exe = shutil.which("lit-efficient")
    assert exe is not None, "the package must install the `lit-efficient` command"
    # a user's own module, importable only because the command runs in its directory
    shutil.copy(os.path.join(HERE, "cli_models.py"), tmp_path / "my_models.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([exe, "fit", "--model", "my_models.TinyRegressor", "--data", "my_models.TinyData",
                             "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.logger=false",
                             *QUIET], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "checkpoints").exists() or any("ckpt" in f for _, _, fs in os.walk(tmp_path) for f in fs)
