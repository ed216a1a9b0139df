"""Sparse-training benchmark: dense vs GraNet, RigL, SET, N:M (SR-STE) and Lightning's ModelPruning,
side by side in one process, on the project's standard tasks.

    python benchmarks/sparse_training.py --tasks vit --seeds 0 1 2          # ~45 min, one thread
    python benchmarks/sparse_training.py --tasks lm --steps 200 --seeds 0 --sparsities 0.9 --update-every 20st
    python benchmarks/sparse_training.py --quick                             # smoke test, ~1 min

Digits ViT: the standard model and recipe (40 epochs = 920 steps, AdamW 3e-3, wd 0.05, cosine),
targets = the 16 Linear weights inside ``blocks``. Pydoc LM: the standard Llama (4 layers, width
256), AdamW 1e-3, cosine with 5% warm-up, targets = the attention/MLP Linear weights. Every method
runs with the same seed, data order and step budget; within a seed the methods run one after the
other, dense first, so machine noise hits all alike.

Reported per method (mean ± std over seeds): final validation accuracy and loss (ViT) or final and
best validation loss (LM); the median and mean wall time of a training step relative to dense
(timed from ``on_train_batch_start`` to the end of every callback's ``on_train_batch_end``, so
mask updates are included) and the whole fit's wall time relative to dense (ModelPruning prunes
at epoch ends, outside the steps); the achieved sparsity of the targets (zeros counted in the
weights after fit); the theoretical inference and training FLOPs of the targeted layers relative
to dense, from each of our callbacks' savings rows.

ModelPruning: global L1 (``l1_unstructured``) on the same weights, with the cumulative sparsity
following the same cubic ramp by epoch, reaching the final sparsity at half of the epochs (the
peer study's setting: 80/90% by epoch 20 of 40).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Measure, add_common_arguments, mean_std, pydoc_llama  # noqa: E402
from examples.vision.data import DigitsDataModule  # noqa: E402
from examples.vision.vit import ViTClassifier  # noqa: E402
from lit_efficient import SET, GraNet, NMSparsity, RigL  # noqa: E402
from lit_efficient.core.callback import EfficientCallback  # noqa: E402
from lit_efficient.core.time import ramp  # noqa: E402

# -- tasks --------------------------------------------------------------------------------------


def vit_task(epochs: int):
    model = ViTClassifier(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                          mlp_ratio=2.0, lr=3e-3, weight_decay=0.05)
    targets = [m for m in model.model.blocks.modules() if isinstance(m, nn.Linear)]
    return model, DigitsDataModule(batch_size=64, seed=0), targets, {"max_epochs": epochs}


def lm_task(steps: int):
    model, data = pydoc_llama(0)
    targets = [m for m in model.model.model.layers.modules() if isinstance(m, nn.Linear)]
    return model, data, targets, {"max_steps": steps, "max_epochs": -1, "val_check_interval": min(50, steps),
                                  "check_val_every_n_epoch": None}


# -- methods ------------------------------------------------------------------------------------


def model_pruning(targets: list[nn.Module], sparsity: float, prune_epochs: int) -> ModelPruning:
    """Lightning's ModelPruning, global L1, cumulative sparsity on a cubic ramp over ``prune_epochs``."""

    def cumulative(epoch: int) -> float:
        return ramp("cubic", epoch + 1, 0, prune_epochs, 0.0, sparsity)

    def amount(epoch: int) -> float:  # torch's prune takes a fraction of what is still unpruned
        before, after = cumulative(epoch - 1) if epoch else 0.0, cumulative(epoch)
        return 0.0 if after <= before else 1.0 - (1.0 - after) / (1.0 - before)

    return ModelPruning("l1_unstructured", parameters_to_prune=[(m, "weight") for m in targets], amount=amount,
                        use_global_unstructured=True, make_pruning_permanent=True, verbose=0)


def method_callbacks(method: str, sparsity: float, targets, prune_epochs: int, every: str) -> list[pl.Callback]:
    makers: dict[str, Callable[[], list[pl.Callback]]] = {
        "dense": lambda: [],
        "granet": lambda: [GraNet(sparsity=sparsity, prune_end=0.5, update_every=every)],
        "granet_momentum": lambda: [GraNet(sparsity=sparsity, prune_end=0.5, update_every=every, growth="momentum")],
        "rigl": lambda: [RigL(sparsity=sparsity, update_every=every)],
        "set": lambda: [SET(sparsity=sparsity, update_every=every)],
        "nm": lambda: [NMSparsity(n=2, m=4)],
        "modelpruning": lambda: [model_pruning(targets, sparsity, prune_epochs)],
    }
    return makers[method]()


# -- measurement --------------------------------------------------------------------------------


def run_one(task: str, method: str, sparsity: float, seed: int, args) -> dict:
    pl.seed_everything(seed, verbose=False)
    if task == "vit":
        model, data, targets, limits = vit_task(args.epochs or 40)
        prune_epochs = max(1, (args.epochs or 40) // 2)
    else:
        model, data, targets, limits = lm_task(args.steps or 600)
        steps_per_epoch = 56
        prune_epochs = max(1, math.ceil((args.steps or 600) / steps_per_epoch / 2))
    if args.quick:
        limits = {"max_steps": 30, "max_epochs": -1, "limit_val_batches": 2, "val_check_interval": 15,
                  "check_val_every_n_epoch": None} if task == "lm" else {"max_epochs": 3}
        prune_epochs = 1
    measure = Measure()
    callbacks = method_callbacks(method, sparsity, targets, prune_epochs, args.update_every) + [measure]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, default_root_dir=args.root, **limits)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_time = time.perf_counter() - start
    weights = [m.weight.detach() for m in targets]
    result = {
        "task": task, "method": method, "sparsity": sparsity if method not in ("dense", "nm") else None,
        "seed": seed, "fit_time": fit_time, "step_times": measure.step_times,
        "val_loss": measure.val_losses[-1], "best_val_loss": min(measure.val_losses),
        "achieved_sparsity": sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights),
        "val_acc": float(trainer.callback_metrics["val/acc"]) * 100 if "val/acc" in trainer.callback_metrics else None,
        "val_steps": measure.val_steps, "val_losses": measure.val_losses,  # curves for run_all's plots
    }
    for callback in callbacks:
        if isinstance(callback, EfficientCallback):
            for row in callback.savings(trainer, model):
                if row.quantity.startswith("inference FLOPs"):
                    result["inference_flops"] = row.ratio
                if row.quantity.startswith("training FLOPs"):
                    result["training_flops"] = row.ratio
    return result


# -- report -------------------------------------------------------------------------------------


def table(results: list[dict], task: str) -> str:
    rows = [r for r in results if r["task"] == task]
    dense = {r["seed"]: r for r in rows if r["method"] == "dense"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["sparsity"]), []).append(r)
    quality = ("val acc %", "val loss") if task == "vit" else ("final val loss", "best val loss")
    head = ["method", "sparsity", *quality, "step time vs dense (median)", "(mean)", "fit time vs dense",
            "achieved sparsity %", "inference FLOPs", "training FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, sparsity), runs in groups.items():
        median_ratio = [statistics.median(r["step_times"]) / statistics.median(dense[r["seed"]]["step_times"])
                        for r in runs if r["seed"] in dense]
        mean_ratio = [statistics.mean(r["step_times"]) / statistics.mean(dense[r["seed"]]["step_times"])
                      for r in runs if r["seed"] in dense]
        fit_ratio = [r["fit_time"] / dense[r["seed"]]["fit_time"] for r in runs if r["seed"] in dense]
        first = [r["val_acc"] for r in runs] if task == "vit" else [r["val_loss"] for r in runs]
        second = [r["val_loss"] for r in runs] if task == "vit" else [r["best_val_loss"] for r in runs]
        label = "2:4" if method == "nm" else ("-" if sparsity is None else f"{sparsity:.0%}")
        cells = [method, label, mean_std(first, digits=1 if task == "vit" else 3), mean_std(second, digits=3),
                 mean_std(median_ratio, digits=3), mean_std(mean_ratio, digits=3), mean_std(fit_ratio, digits=3),
                 mean_std([r["achieved_sparsity"] for r in runs], 100, 1),
                 mean_std([r.get("inference_flops") for r in runs], digits=3),
                 mean_std([r.get("training_flops") for r in runs], digits=3)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in rows})
    return f"{task}: seeds {seeds}, {torch.get_num_threads()} thread(s)\n" + "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["vit"], choices=["vit", "lm"])
    parser.add_argument("--methods", nargs="+", default=["dense", "granet", "rigl", "set", "nm", "modelpruning"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="ViT epochs (default 40)")
    parser.add_argument("--steps", type=int, default=None, help="LM steps (default 600)")
    parser.add_argument("--update-every", default="50st", help="mask-update interval of GraNet/RigL/SET")
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    for task in args.tasks:
        warm_up = argparse.Namespace(**{**vars(args), "quick": True})
        run_one(task, "dense", 0.0, 0, warm_up)  # untimed: first-run costs (allocator, caches) out of dense's time
        for seed in args.seeds:
            for method in args.methods:
                for sparsity in ([None] if method in ("dense", "nm") else args.sparsities):
                    result = run_one(task, method, sparsity or 0.0, seed, args)
                    results.append(result)
                    print(f"[{task} seed {seed}] {method} {sparsity or ''}: val loss {result['val_loss']:.3f} "
                          f"acc {result['val_acc']} fit {result['fit_time']:.0f}s", flush=True)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(results, f)
        print(table(results, task), flush=True)
    return results


if __name__ == "__main__":
    main()
