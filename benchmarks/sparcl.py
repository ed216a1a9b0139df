"""SparCL benchmark: accuracy, forgetting and training FLOPs of sparse continual learning.

    python benchmarks/sparcl.py --seeds 0 1 2 3 4     # Split-digits, 5 tasks x 10 epochs, ~4 min a seed
    python benchmarks/sparcl.py --quick               # smoke test

Split-digits (the standard digits split cut into 5 tasks of 2 classes, one fit, 10 epochs a
task), the small CNN of ``examples/vision/continual.py`` (stem conv and head dense), SGD lr 0.03,
batch 32, DER++ with a 200-sample buffer (α 0.1, β 0.5). Side by side in one process with the same
seeds: fine-tuning and ER as references, dense DER++, and SparCL-DER++ at 75% and 90% sparsity
(TDM + DGM at 80% + DDR removing 30%, the paper's settings scaled to 10-epoch tasks).

Reported per method: average accuracy over the 5 tasks after the last one (Class-IL and Task-IL),
Class-IL forgetting, and training FLOPs relative to dense DER++ on all data — every conv/linear
layer counted (the dense stem and head at full cost on every step taken), weights sparsity,
gradient sparsity and removed data all included; fit time relative to dense DER++.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_common_arguments, mean_std  # noqa: E402
from examples.vision.continual import ContinualClassifier, SplitDigits  # noqa: E402
from lit_efficient import SparCL  # noqa: E402
from lit_efficient.continual.metrics import AccuracyMatrix, average_accuracy, forgetting  # noqa: E402
from lit_efficient.core.targets import select_targets  # noqa: E402
from lit_efficient.sparsity.masks import ForwardFlops  # noqa: E402

METHODS = {  # name -> (rehearsal, SparCL options or None)
    "fine-tuning": ("none", None),
    "ER": ("er", None),
    "DER++": ("derpp", None),
    "SparCL-DER++ 75%": ("derpp", dict(sparsity=0.75)),
    "SparCL-DER++ 90%": ("derpp", dict(sparsity=0.90)),
    "SparCL-DER++ 90%, no DDR": ("derpp", dict(sparsity=0.90, ddr=False)),  # ablations
    "SparCL-DER++ 90%, no TDM": ("derpp", dict(sparsity=0.90, tdm=False)),
}
DEFAULT_METHODS = [m for m in METHODS if ", no " not in m]


def layer_flops(model: torch.nn.Module) -> tuple[float, float]:
    """Forward FLOPs of every conv/linear layer of ``model``, and of those SparCL targets by default."""
    every = select_targets(model, include=["*"], kinds=("linear", "conv"))
    flops = ForwardFlops(every).attach()
    model(torch.zeros(1, 1, 8, 8))
    flops.detach()
    targeted = {t.name for t in select_targets(model, kinds=("linear", "conv"))}
    total = sum(flops.flops)
    return total, sum(f for f, t in zip(flops.flops, every) if t.name in targeted)


def run_one(name: str, seed: int, epochs_per_task: int, root: str, width: int = 32) -> dict:
    method, options = METHODS[name]
    pl.seed_everything(seed, verbose=False)
    model = ContinualClassifier(method=method, buffer_size=200, alpha=0.1, beta=0.5, lr=0.03, seed=seed, width=width)
    data = SplitDigits(num_tasks=5, epochs_per_task=epochs_per_task, batch_size=32, seed=seed)
    matrix = AccuracyMatrix()
    sparcl = SparCL(seed=seed, **options) if options is not None else None
    callbacks = [matrix] + ([sparcl] if sparcl is not None else [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=5 * epochs_per_task, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=root)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_time = time.perf_counter() - start
    total, targeted = layer_flops(model.model)
    if sparcl is not None:  # targeted layers at SparCL's cost, the rest dense on each step taken
        steps = trainer.global_step / sparcl.full_steps
        flops = (targeted * sparcl.density_steps / sparcl.full_steps + (total - targeted) * steps) / total
        removed = sparcl.removed_total / sparcl.samples_total if sparcl.samples_total else 0.0
    else:  # per step: the current batch plus the replayed batches (ER: 1, DER++: 2), all dense
        flops, removed = {"none": 1, "er": 2, "derpp": 3}[method] / 3, 0.0
    cil, til = matrix.matrices["val/acc_cil"], matrix.matrices["val/acc_til"]
    return {"name": name, "seed": seed, "cil": average_accuracy(cil), "til": average_accuracy(til),
            "forgetting": forgetting(cil), "flops": flops, "removed": removed, "fit": fit_time,
            "steps": trainer.global_step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs-per-task", type=int, default=10)
    parser.add_argument("--width", type=int, default=32,
                        help="the CNN's stem channels (default 32; the rest scale with it)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS),
                        help="default: all but the ablations ('..., no DDR', '..., no TDM')")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs_per_task = args.seeds[:1], 2
    torch.set_num_threads(args.threads)
    results = []
    for seed in args.seeds:
        for name in args.methods:
            r = run_one(name, seed, args.epochs_per_task, args.root, args.width)
            results.append(r)
            print(f"[seed {seed}] {name}: Class-IL {r['cil']:.2f}, Task-IL {r['til']:.2f}, forgetting "
                  f"{r['forgetting']:.2f}, FLOPs {r['flops']:.4f}, removed {r['removed']:.3f}, {r['steps']} steps, "
                  f"fit {r['fit']:.1f}s", flush=True)
    dense = {r["seed"]: r for r in results if r["name"] == "DER++"}
    print(f"\nSplit-digits (5 tasks x 2 classes, {args.epochs_per_task} epochs a task), "
          f"small CNN of width {args.width}, "
          f"buffer 200, seeds {args.seeds}, {torch.get_num_threads()} thread(s)")
    print("| method | Class-IL avg acc % | Task-IL avg acc % | Class-IL forgetting | training FLOPs vs dense DER++ "
          "| fewer FLOPs | data removed | fit time vs DER++ |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.methods:
        runs = [r for r in results if r["name"] == name]
        fit = mean_std([r["fit"] / dense[r["seed"]]["fit"] for r in runs], digits=2) if dense else "-"
        mean_flops = sum(r["flops"] for r in runs) / len(runs)
        print(f"| {name} | {mean_std([r['cil'] for r in runs], digits=2)} | "
              f"{mean_std([r['til'] for r in runs], digits=2)} | "
              f"{mean_std([r['forgetting'] for r in runs], digits=2)} | "
              f"{mean_std([r['flops'] for r in runs], digits=4)} | "
              f"{1 / mean_flops:.1f}x | {mean_std([r['removed'] for r in runs], scale=100, digits=1)}% | {fit} |")


if __name__ == "__main__":
    main()
