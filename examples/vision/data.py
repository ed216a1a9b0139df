"""Image data for the vision examples: scikit-learn's bundled digits (no download, ever).

``DigitsDataModule`` is the project's standard digits task, exactly: ``load_digits``
pixels divided by 16 as float ``1x8x8`` images in ``[0, 1]``, split by
``torch.randperm(1797, generator=torch.Generator().manual_seed(split_seed))`` into the first
1437 samples for training and the last 360 for validation, batches of 64 shuffled by a seeded
generator. ``image_size=32`` upsamples bilinearly once at setup (the 32x32 task).

Use it from a yaml config (``data: {class_path: examples.vision.data.DigitsDataModule}``) or
directly::

    dm = DigitsDataModule(image_size=16, classes=[0, 1, 2])
    trainer.fit(model, datamodule=dm)

Users who already have torchvision's MNIST, Fashion-MNIST or CIFAR-10 on disk can pass
``dataset="mnist"`` and ``data_dir=...``; nothing is ever downloaded, and the official
train/test splits serve as train/validation.
"""

from __future__ import annotations

import os
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

DIGITS_SIZE = 1797
DIGITS_TRAIN = 1437  # the remaining 360 are validation
_NATIVE_SIZE = {"digits": 8, "mnist": 28, "fashion_mnist": 28, "cifar10": 32}


class DigitsDataModule(LightningDataModule):
    """Digits (or an on-disk torchvision dataset) as ``(x, y)`` tensors in ``[0, 1]``.

    Args:
        batch_size: samples per batch (default 64).
        seed: seed of the generator that shuffles the training loader (default 0).
        split_seed: seed of the train/validation permutation of the digits (default 0).
        image_size: side of the square images; ``None`` (default) keeps the native size
            (8 for digits). Any other size is resized bilinearly once at setup.
        num_workers: DataLoader workers (default 0: the data is a tensor in memory).
        dataset: ``"digits"`` (default, bundled with scikit-learn), or ``"mnist"``,
            ``"fashion_mnist"``, ``"cifar10"`` read from ``data_dir`` (never downloaded).
        data_dir: root folder holding the torchvision dataset; required unless digits.
        classes: keep only samples with these labels (labels are not renumbered), applied
            after the split so the split is the same whatever classes are kept.
    """

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        split_seed: int = 0,
        image_size: Optional[int] = None,
        num_workers: int = 0,
        dataset: Literal["digits", "mnist", "fashion_mnist", "cifar10"] = "digits",
        data_dir: Optional[str] = None,
        classes: Optional[list[int]] = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"`image_size` must be >= 1 or None, got {image_size}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if dataset not in _NATIVE_SIZE:
            raise ValueError(f"`dataset` must be one of {sorted(_NATIVE_SIZE)}, got {dataset!r}")
        if dataset != "digits" and data_dir is None:
            raise ValueError(
                f"`data_dir` is required for dataset={dataset!r}: point it at a folder that "
                "already holds the torchvision dataset (nothing is downloaded)"
            )
        if classes is not None and len(classes) == 0:
            raise ValueError("`classes` must be None or a non-empty list of labels")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seed = seed
        self.split_seed = split_seed
        self.image_size = image_size if image_size is not None else _NATIVE_SIZE[dataset]
        self.num_workers = num_workers
        self.dataset = dataset
        self.data_dir = data_dir
        self.classes = None if classes is None else [int(c) for c in classes]
        self.num_classes = 10
        self.in_chans = 3 if dataset == "cifar10" else 1
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    # ------------------------------------------------------------------ loading
    def _load_digits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(DIGITS_SIZE, generator=torch.Generator().manual_seed(self.split_seed))
        train_idx, val_idx = perm[:DIGITS_TRAIN], perm[DIGITS_TRAIN:]
        return x[train_idx], y[train_idx], x[val_idx], y[val_idx]

    def _load_torchvision(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        import torchvision.datasets as tvd

        assert self.data_dir is not None
        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[self.dataset]
        out = []
        for train in (True, False):
            try:
                ds = cls(root=os.path.expanduser(self.data_dir), train=train, download=False)
            except RuntimeError as err:  # torchvision's "Dataset not found"
                raise FileNotFoundError(
                    f"{self.dataset!r} not found under data_dir={self.data_dir!r} ({err}); this "
                    "module never downloads: fetch it once with torchvision's download=True"
                ) from err
            data = torch.as_tensor(ds.data)
            x = data.permute(0, 3, 1, 2) if data.ndim == 4 else data.unsqueeze(1)  # CIFAR is NHWC
            out += [x.float() / 255.0, torch.as_tensor(ds.targets, dtype=torch.long)]
        return out[0], out[1], out[2], out[3]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.image_size:
            return x
        # Once at setup rather than per batch: the whole dataset is a small in-memory tensor.
        x = F.interpolate(
            x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
            antialias=x.shape[-1] > self.image_size,
        )
        return x.clamp_(0.0, 1.0)

    def _keep(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.classes is None:
            return x, y
        mask = torch.isin(y, torch.tensor(self.classes, dtype=torch.long))
        return x[mask], y[mask]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        load = self._load_digits if self.dataset == "digits" else self._load_torchvision
        x_tr, y_tr, x_va, y_va = load()
        self.train_set = TensorDataset(*self._keep(self._resize(x_tr), y_tr))
        self.val_set = TensorDataset(*self._keep(self._resize(x_va), y_va))

    # -------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        # A fresh seeded generator per loader: the same seed gives the same batch order.
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=None,
            shuffle=True,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
