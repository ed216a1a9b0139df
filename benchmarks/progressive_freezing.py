"""Progressive freezing benchmark: what freezing a true prefix saves, side by side in one process.

    python benchmarks/progressive_freezing.py --seeds 0 1 2      # ~7 min a seed, one thread
    python benchmarks/progressive_freezing.py --task vit8 --epochs 40 --seeds 0 1 2   # 8x8 ViT, ~4 min a seed
    python benchmarks/progressive_freezing.py --task vit8 --epochs 40 --turns 0.5   # runs taking turns (below)
    python benchmarks/progressive_freezing.py --quick            # smoke test

Task: the standard 32×32 digits ViT (patch 4, width 96, 6 blocks; AdamW 2e-3, wd 0.05, cosine,
batch 64, 20 epochs). Methods, all within one seed one after the other:

* ``baseline`` — no freezing;
* ``linear 1.0`` / ``linear 0.5`` — ProgressiveFreezing, linear ramp from half-way to all / half
  of the blocks (Composer's LayerFreezing schedule, ``freeze_start 0.5``), freezing a true prefix;
* ``freezeout`` — ProgressiveFreezing's default FreezeOut schedule (t0 0.8, cubic);
* ``freezeout t0 0.5`` / ``linear 0.25`` — earlier schedules (blocks from 12% / 25% of the run),
  for tasks that over-fit;
* ``adaptive`` — gradient-norm-change criterion from 30% of the run, at most 5 of 6 blocks;
* ``leaf rule`` — Composer's rule, emulated: the same linear schedule freezes transformer blocks
  only (requires_grad off, out of the optimizer) while the patch embedding and position/class
  tokens keep training, so the backward still runs through every frozen block to reach them.

With ``--turns SECONDS`` a seed's methods run in separate processes that take turns on the machine
in slices of that length, each timed by the time it held it: a machine whose speed drifts over
minutes (this project's VM: ±15%) then slows every method alike, and the ratios stop depending on
which ran when.

Reported (mean ± std over seeds): final validation accuracy, fit wall time and the median step
time over the last quarter of training relative to the baseline, and the parameter-steps frozen.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Measure, Turns, add_common_arguments, mean_std, pydoc_llama, run_in_turns  # noqa: E402
from examples.vision.data import DigitsDataModule  # noqa: E402
from examples.vision.vit import ViTClassifier  # noqa: E402
from lit_efficient import ProgressiveFreezing  # noqa: E402
from lit_efficient.freezing.freezer import remove_from_optimizer  # noqa: E402
from lit_efficient.freezing.schedules import linear_frozen_count  # noqa: E402


class LeafFreezing(pl.Callback):
    """Composer's LayerFreezing rule on the ViT blocks: freezes blocks but not what feeds them."""

    def __init__(self, freeze_start: float, freeze_level: float) -> None:
        self.freeze_start, self.freeze_level, self.frozen = freeze_start, freeze_level, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        blocks = pl_module.model.blocks
        count = linear_frozen_count(trainer.global_step / trainer.estimated_stepping_batches, len(blocks),
                                    self.freeze_start, self.freeze_level)
        if count > self.frozen:
            params = [p for b in blocks[self.frozen:count] for p in b.parameters()]
            for p in params:
                p.requires_grad_(False)
                p.grad = None
            remove_from_optimizer(trainer.optimizers[0], params)
            self.frozen = count


METHODS = {
    "baseline": lambda: [],
    "linear 1.0": lambda: [ProgressiveFreezing(schedule="linear", freeze_start=0.5, freeze_level=1.0)],
    "linear 0.5": lambda: [ProgressiveFreezing(schedule="linear", freeze_start=0.5, freeze_level=0.5)],
    "freezeout": lambda: [ProgressiveFreezing(schedule="freezeout")],
    # the same schedule serving the frozen blocks' outputs from memory (the data repeat exactly)
    "freezeout cached": lambda: [ProgressiveFreezing(schedule="freezeout", cache_frozen_mb=1024)],
    "freezeout t0 0.75 cached": lambda: [ProgressiveFreezing(schedule="freezeout", t0=0.75, cache_frozen_mb=1024)],
    "freezeout t0 0.7 cached": lambda: [ProgressiveFreezing(schedule="freezeout", t0=0.7, cache_frozen_mb=1024)],
    # earlier schedules, for runs that over-fit (the 8x8 ViT, the pydoc LM past ~250 steps)
    "freezeout t0 0.5": lambda: [ProgressiveFreezing(schedule="freezeout", t0=0.5)],
    "linear 0.25": lambda: [ProgressiveFreezing(schedule="linear", freeze_start=0.25, freeze_level=1.0)],
    "adaptive": lambda: [ProgressiveFreezing(schedule="adaptive", freeze_start=0.3, check_every="23st",
                                             freeze_level=5 / 6)],
    "leaf rule": lambda: [LeafFreezing(freeze_start=0.5, freeze_level=1.0)],
}


TASKS = {  # the standard ViTs: (model arguments, image size); and "lm", the pydoc Llama
    "lm": ({}, None),
    "vit32": (dict(img_size=32, patch_size=4, embed_dim=96, depth=6, num_heads=3, lr=2e-3), 32),
    "vit8": (dict(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4, lr=3e-3), None),
}


def run_one(method: str, seed: int, epochs: int, root: str, task: str = "vit32", turns: Optional[Turns] = None) -> dict:
    """``epochs`` counts optimizer steps for the LM (validation every 50). With ``turns`` the fit
    time is the time this run held the machine (see ``--turns``)."""
    pl.seed_everything(seed, verbose=False)
    if task == "lm":  # the standard pydoc Llama
        model, data = pydoc_llama(seed)
        limits = {"max_steps": epochs, "max_epochs": -1, "val_check_interval": min(50, epochs),
                  "check_val_every_n_epoch": None}
    else:
        arguments, image_size = TASKS[task]
        model = ViTClassifier(in_chans=1, num_classes=10, mlp_ratio=2.0, weight_decay=0.05, **arguments)
        data = DigitsDataModule(batch_size=64, seed=seed, image_size=image_size)
        limits = {"max_epochs": epochs}
    steps = Measure()
    callbacks = METHODS[method]() + ([turns] if turns else []) + [steps]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, default_root_dir=root, **limits)
    clock = (lambda: turns.held) if turns else time.perf_counter
    start = clock()
    trainer.fit(model, datamodule=data)
    fit = clock() - start
    freezing = next((c for c in callbacks if isinstance(c, ProgressiveFreezing)), None)
    quarter = steps.step_times[-max(1, len(steps.step_times) // 4):]
    return {"method": method, "seed": seed, "fit": fit, "late_step": statistics.median(quarter),
            "samples_per_s": steps.samples / fit,
            "acc": float(trainer.callback_metrics["val/acc"]) * 100 if task != "lm" else min(steps.val_losses),
            "final_loss": steps.val_losses[-1] if steps.val_losses else None,
            "step_times": steps.step_times, "val_steps": steps.val_steps, "val_losses": steps.val_losses,
            "frozen_steps": freezing.frozen_param_steps / max(1, freezing.counted_steps) if freezing else None}


def warm_up(root: str, task: str) -> None:
    """A short untimed run, so that first-call costs stay out of the timed ones in this process."""
    run_one("baseline", 0, 2 if task == "lm" else 1, root, task)


def warmed_up_run(method: str, seed: int, epochs: int, root: str, task: str, threads: int,
                  turns: Optional[Turns] = None) -> dict:
    """One timed run after a warm-up, in a process of its own (``--turns``)."""
    torch.set_num_threads(threads)
    warm_up(root, task)
    return run_one(method, seed, epochs, root, task, turns)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--task", choices=sorted(TASKS), default="vit32",
                        help="vit32: 32x32 digits, 20 epochs (default); vit8: the 8x8 digits ViT, use --epochs 40; "
                             "lm: the pydoc LM, --epochs counts steps (reports the best val loss as 'val acc')")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--turns", type=float, default=0.0, metavar="SECONDS",
                        help="run a seed's methods in parallel processes that take turns on the machine in slices "
                             "of this many seconds, so its speed drifting over minutes slows them alike "
                             "(default 0: one after the other in this process)")
    parser.add_argument("--json", default=None, help="also write every run's numbers and validation curves here")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    torch.set_num_threads(args.threads)
    if args.task == "lm" and "leaf rule" in args.methods:
        args.methods.remove("leaf rule")  # the emulation knows the ViT's blocks only
    if not args.turns:
        warm_up(args.root, args.task)
    results = []
    for seed in args.seeds:
        if args.turns:
            runs = run_in_turns(warmed_up_run, [(method, seed, args.epochs, os.path.join(args.root, str(i)), args.task,
                                                 args.threads) for i, method in enumerate(args.methods)], args.turns)
        else:
            runs = (run_one(method, seed, args.epochs, args.root, args.task) for method in args.methods)
        for r in runs:
            results.append(r)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f)
            print(f"[seed {seed}] {r['method']}: acc {r['acc']:.3f} fit {r['fit']:.1f}s "
                  f"late step {r['late_step'] * 1000:.1f}ms", flush=True)
    base = {r["seed"]: r for r in results if r["method"] == "baseline"}
    task = "pydoc LM, {} steps" if args.task == "lm" else args.task + " digits ViT, {} epochs"
    order = f"taking turns in {args.turns} s slices" if args.turns else "one after the other"
    print(f"\n{task.format(args.epochs)}, seeds {args.seeds}, {args.threads} thread(s), {order}")
    quality = "best val loss" if args.task == "lm" else "val acc %"
    final = " final val loss |" if args.task == "lm" else ""
    print(f"| method | {quality} |{final} fit time vs baseline | samples/s (whole fit) | late step time vs baseline "
          "| parameter-steps frozen % |")
    print("|---|---|" + ("---|" if final else "") + "---|---|---|---|")
    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        finals = f" {mean_std([r['final_loss'] for r in runs], digits=3)} |" if final else ""
        print(f"| {method} | {mean_std([r['acc'] for r in runs], digits=3 if args.task == 'lm' else 1)} |{finals} "
              f"{mean_std([r['fit'] / base[r['seed']]['fit'] for r in runs], digits=3)} | "
              f"{mean_std([r.get('samples_per_s') for r in runs], digits=0)} | "
              f"{mean_std([r['late_step'] / base[r['seed']]['late_step'] for r in runs], digits=3)} | "
              f"{mean_std([r['frozen_steps'] for r in runs], scale=100, digits=1)} |")


if __name__ == "__main__":
    main()
