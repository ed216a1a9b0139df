"""InfoBatch benchmark: how much data and time pruning saves on the digits ViT, and at what accuracy.

    python benchmarks/infobatch.py --seeds 0 1 2 3 4      # 8x8 digits ViT, 40 epochs, ~1.5 min a seed
    python benchmarks/infobatch.py --quick               # smoke test
    python benchmarks/infobatch.py --task fashion_mnist --train-subset 10000 --epochs 20 --seeds 0 1
        # 28x28 ViT on Fashion-MNIST (apt-get install dataset-fashion-mnist), 10k-image validation set

Side by side in one process, same seeds: the baseline (all data every epoch) vs InfoBatch at
``prune_ratio`` 0.5 (and any others given), ``delta`` 0.875. The task is the standard 8x8 digits
ViT (patch 2, width 64, 4 blocks; AdamW 3e-3, wd 0.05, batch 64, warm-up + cosine over
``estimated_stepping_batches``, which InfoBatch keeps ending at the end). Reported: final and best
validation accuracy, samples forwarded and optimizer steps relative to the baseline, fit wall time
relative to the baseline. ``--same-budget`` adds the control that says whether InfoBatch's choice
of samples matters: plain training shortened to the steps InfoBatch took. ``--ablations`` adds
InfoBatch without its rescaling, random pruning of as many samples (the paper's ablations), and
InfoBatch's loader and sample order with nothing pruned (what a different data order alone does).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import os
import statistics
import sys
import time
from typing import Optional

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_common_arguments, mean_std  # noqa: E402
from examples.vision.data import DigitsDataModule  # noqa: E402
from examples.vision.vit import ViTClassifier  # noqa: E402
from lit_efficient import InfoBatch  # noqa: E402


class Accuracy(pl.Callback):
    def __init__(self):
        self.accs, self.samples = [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.samples += batch[0].shape[0]

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.accs.append(float(trainer.callback_metrics["val/acc"]) * 100)


class InfoBatchNoRescaling(InfoBatch):
    """Ablation: InfoBatch's pruning without the 1/(1 - prune_ratio) rescaling of the kept well-learned samples."""

    def prepare_epoch(self, epoch: int, max_epochs: int) -> None:
        super().prepare_epoch(epoch, max_epochs)
        self.multipliers = torch.ones_like(self.multipliers)


class RandomPruning(InfoBatch):
    """Ablation: skip as many samples as InfoBatch would, drawn uniformly from the whole dataset (no
    rescaling: uniform skipping leaves the expected mean gradient unchanged)."""

    def prepare_epoch(self, epoch: int, max_epochs: int) -> None:
        super().prepare_epoch(epoch, max_epochs)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self.order = torch.randperm(self.num_samples, generator=generator)[: self.order.numel()]
        self.multipliers = torch.ones_like(self.multipliers)


# name -> (callback, prune_ratio: None = the first of --ratios); ratio 0 keeps InfoBatch's loader and sample
# order but prunes nothing, which separates the effect of pruning from that of a different data order
ABLATIONS = {"InfoBatch {ratio}, no rescaling": (InfoBatchNoRescaling, None),
             "random pruning, InfoBatch's count": (RandomPruning, None),
             "InfoBatch's data order, no pruning": (InfoBatch, 0.0)}


DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # `apt-get install dataset-fashion-mnist`


def read_idx(path: str) -> torch.Tensor:
    """An IDX file (the MNIST format; ``.gz`` or not) as a uint8 tensor of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8).view(shape)


class FashionMNISTFiles(DigitsDataModule):
    """Fashion-MNIST read from a folder of its four IDX files (Debian's package, or torchvision's
    ``FashionMNIST/raw``); the official train/test split as train/validation; optionally only the first
    ``train_subset`` training images of a fixed (seed 0) permutation."""

    def __init__(self, data_dir: str, train_subset: int = 0, **kwargs) -> None:
        super().__init__(dataset="fashion_mnist", data_dir=data_dir, **kwargs)
        self.train_subset = train_subset

    def _load_torchvision(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        def load(stem: str) -> torch.Tensor:
            for name in (stem, stem + ".gz"):
                path = os.path.join(self.data_dir, name)
                if os.path.isfile(path):
                    return read_idx(path)
            raise FileNotFoundError(f"{stem}[.gz] not in --data-dir {self.data_dir!r}: install Debian's "
                                    f"dataset-fashion-mnist (files in {DEBIAN_FASHION_MNIST}) "
                                    "or point at FashionMNIST/raw")
        x_train, x_val = (load(f"{s}-images-idx3-ubyte").unsqueeze(1).float() / 255.0 for s in ("train", "t10k"))
        y_train, y_val = (load(f"{s}-labels-idx1-ubyte").long() for s in ("train", "t10k"))
        if self.train_subset:
            keep = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))[: self.train_subset]
            x_train, y_train = x_train[keep], y_train[keep]
        return x_train, y_train, x_val, y_val


def task_model_and_data(task: str, seed: int, data_dir: Optional[str], train_subset: int):
    """The standard 8x8 digits ViT, or a 28x28 ViT (patch 7, batch 128) on Fashion-MNIST read from
    ``data_dir`` (nothing is downloaded)."""
    if task == "digits":
        return (ViTClassifier(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                              mlp_ratio=2.0, lr=3e-3, weight_decay=0.05), DigitsDataModule(batch_size=64, seed=seed))
    model = ViTClassifier(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                          mlp_ratio=2.0, lr=3e-3, weight_decay=0.05)
    return model, FashionMNISTFiles(data_dir, train_subset, batch_size=128, seed=seed)


def run_task(ratio: float, seed: int, epochs: int, root: str, name: str = "", pruner: Optional[type] = None,
             task: str = "digits", data_dir: Optional[str] = None, train_subset: int = 0) -> dict:
    pl.seed_everything(seed, verbose=False)
    model, data = task_model_and_data(task, seed, data_dir, train_subset)
    accuracy = Accuracy()
    pruner = pruner or (InfoBatch if ratio else None)
    callbacks = ([pruner(prune_ratio=ratio, delta=0.875, seed=seed)] if pruner else []) + [accuracy]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    return {"name": name or ("baseline" if ratio == 0.0 else f"InfoBatch {ratio}"), "ratio": ratio, "seed": seed,
            "epochs": epochs, "fit": time.perf_counter() - start, "acc": accuracy.accs[-1],
            "best": max(accuracy.accs), "samples": accuracy.samples, "steps": trainer.global_step,
            "lr_end": trainer.optimizers[0].param_groups[0]["lr"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5])
    parser.add_argument("--same-budget", action="store_true",
                        help="also train the baseline for as many optimizer steps as InfoBatch took (fewer epochs)")
    parser.add_argument("--task", choices=("digits", "fashion_mnist"), default="digits")
    parser.add_argument("--data-dir", default=DEBIAN_FASHION_MNIST,
                        help="fashion_mnist: folder of its four IDX files (default: Debian's dataset-fashion-mnist)")
    parser.add_argument("--train-subset", type=int, default=0, help="fashion_mnist: train on this many images (0: all)")
    parser.add_argument("--ablations", action="store_true",
                        help="also InfoBatch without rescaling, random pruning of as many samples (both at the first "
                             "ratio), and InfoBatch's sample order with nothing pruned")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 3
    torch.set_num_threads(args.threads)
    run_one = functools.partial(run_task, task=args.task, data_dir=args.data_dir, train_subset=args.train_subset)
    run_one(0.0, 0, 1, args.root)  # untimed warm-up
    methods = [0.0, *args.ratios]
    results = []
    for seed in args.seeds:
        first = len(results)
        for ratio in methods:
            results.append(run_one(ratio, seed, args.epochs, args.root))
        if args.same_budget and args.ratios:
            # the control: plain training shortened to the optimizer steps InfoBatch took (same cosine, shorter)
            steps = results[-1]["steps"] / results[-1 - len(args.ratios)]["steps"]
            results.append(run_one(0.0, seed, max(1, round(args.epochs * steps)), args.root, "baseline, same steps"))
        if args.ablations and args.ratios:
            for name, (pruner, ratio) in ABLATIONS.items():
                ratio = args.ratios[0] if ratio is None else ratio
                results.append(run_one(ratio, seed, args.epochs, args.root, name.format(ratio=ratio), pruner))
        for r in results[first:]:
            print(f"[seed {seed}] {r['name']} ({r['epochs']} epochs): acc {r['acc']:.2f} (best {r['best']:.2f}), "
                  f"{r['samples']} samples, {r['steps']} steps, fit {r['fit']:.1f}s, final lr {r['lr_end']:.2e}",
                  flush=True)
    base = {r["seed"]: r for r in results if r["name"] == "baseline"}
    what = ("8x8 digits ViT" if args.task == "digits"
            else f"Fashion-MNIST ViT ({args.train_subset or 60000} training images)")
    print(f"\n{what}, {args.epochs} epochs, seeds {args.seeds}, {torch.get_num_threads()} thread(s)")
    print("| method | final val acc % | final acc − baseline's, same seed (points) | best val acc % "
          "| samples forwarded vs baseline | optimizer steps vs baseline | fit time vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        paired = [r["acc"] - base[r["seed"]]["acc"] for r in runs]
        print(f"| {name} | {mean_std([r['acc'] for r in runs], digits=2)} | {mean_std(paired, digits=2)} "
              f"(SE {statistics.stdev(paired) / len(paired) ** 0.5 if len(paired) > 1 else 0.0:.2f}) | "
              f"{mean_std([r['best'] for r in runs], digits=2)} | "
              f"{mean_std([r['samples'] / base[r['seed']]['samples'] for r in runs], digits=3)} | "
              f"{mean_std([r['steps'] / base[r['seed']]['steps'] for r in runs], digits=3)} | "
              f"{mean_std([r['fit'] / base[r['seed']]['fit'] for r in runs], digits=3)} |")

if __name__ == "__main__":
    main()
