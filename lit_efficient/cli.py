"""The ``lit-efficient`` command: a LightningCLI that accepts any LightningModule and
LightningDataModule by class path, so a user trains their own module with our callbacks
from a yaml file::

    lit-efficient fit --config examples/vision/vit_digits.yaml
    lit-efficient fit --model my_pkg.MyModule --data my_pkg.MyData \\
        --trainer.callbacks+=lit_efficient.GraNet --trainer.callbacks.sparsity=0.9

Like ``python -m``, the current directory is importable, so ``examples.vision.vit.ViTClassifier``
resolves from the repository root and a user's own ``my_module.MyModule`` from theirs.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI


def main(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Run the CLI. ``args`` defaults to ``sys.argv[1:]``; ``run=False`` only instantiates."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    kwargs: dict[str, Any] = dict(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    if not run:
        kwargs["run"] = False
    return LightningCLI(**kwargs)


def entry_point() -> None:
    """The ``lit-efficient`` console script (returns nothing, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":  # pragma: no cover
    entry_point()
