"""GaLore benchmark: optimizer state, optimizer-step time and validation loss, side by side.

    python benchmarks/galore.py                       # pydoc Llama, 600 steps, every method (~1 h, 1 thread)
    python benchmarks/galore.py --steps 300 --threads 2
    python benchmarks/galore.py --quick               # smoke test
    python benchmarks/galore.py --steps 300 --threads 2 --seeds 0 1 2 --methods AdamW galore_torch \
        "GaLore svd keep" "GaLore svd align" "GaLore svd rotate"   # what a refresh does to the moments

Task: the standard pydoc LM (Llama, d 256, 4 layers, vocab 2048, batch 16 x 128, AdamW 1e-3,
wd 0.1, cosine with 5% warm-up). GaLore on every attention/MLP Linear (28 matrices), rank 64
(d/4), gap 200, scale 0.25, ``std``; embeddings, norms and the head stay on AdamW. Methods:
torch AdamW; our GaLore with ``svd``, ``randomized_svd`` and ``random`` (APOLLO-style) bases, 32-bit
and 8-bit moments; and ``galore_torch.GaLoreAdamW`` (the reference package) at the same settings.

Reported: optimizer-state bytes of the projected matrices (moments + stored bases/projectors)
relative to AdamW's for the same matrices, and of the whole optimizer; the median time of the
optimizer update on ordinary and on refresh steps and its mean over the run (amortised), relative
to AdamW's; the median full step time; the best validation loss and the step it came at. With
several ``--seeds``, one such table per seed, then a last one of each method's best validation loss
per seed and its mean, relative to AdamW's mean.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Measure, add_common_arguments, pydoc_llama  # noqa: E402
from examples.common import total_training_steps, warmup_cosine  # noqa: E402
from examples.nlp.common import decay_groups  # noqa: E402
from examples.nlp.lm import CausalLM  # noqa: E402
from lit_efficient import GaLore  # noqa: E402
from lit_efficient.core.targets import select_targets  # noqa: E402
from lit_efficient.lowrank.optim import state_bytes  # noqa: E402

RANK, GAP, SCALE = 64, 200, 0.25
METHODS = {  # name -> GaLore callback options (None: no callback)
    "AdamW": None,
    "GaLore svd": dict(projection="svd"),  # moments_on_refresh at its default
    "GaLore svd keep": dict(projection="svd", moments_on_refresh="keep"),  # the reference behaviour
    "GaLore svd align": dict(projection="svd", moments_on_refresh="align"),
    "GaLore svd rotate": dict(projection="svd", moments_on_refresh="rotate"),
    # off the recipe: the full learning rate on the projected matrices (the peer study's best galore-torch)
    "GaLore svd rotate, scale 1": dict(projection="svd", moments_on_refresh="rotate", scale=1.0),
    "GaLore randomized_svd": dict(projection="randomized_svd"),
    "GaLore random": dict(projection="random"),
    "GaLore svd 8-bit": dict(projection="svd", eight_bit=True),
    "GaLore random 8-bit": dict(projection="random", eight_bit=True),
    "galore_torch": "reference",
}


class ReferenceGaLoreLM(CausalLM):
    """The same LM whose optimizer is galore_torch.GaLoreAdamW on the same matrices."""

    update_proj_gap = GAP  # an instance may set its own (galore_ddp.py)

    def configure_optimizers(self):
        from galore_torch import GaLoreAdamW as ReferenceAdamW

        h = self.hparams
        matrices = {id(t.param): t.param for t in select_targets(self, ["all-linear"], kinds=("linear",))}
        groups = []
        for group in decay_groups(self, h.weight_decay):
            rest = [p for p in group["params"] if id(p) not in matrices]
            if rest:
                groups.append({**group, "params": rest})
        groups.append({"params": list(matrices.values()), "weight_decay": h.weight_decay, "rank": RANK,
                       "update_proj_gap": self.update_proj_gap, "scale": SCALE, "proj_type": "std"})
        optimizer = ReferenceAdamW(groups, lr=h.lr, eps=1e-8, no_deprecation_warning=True)
        scheduler = warmup_cosine(optimizer, total_training_steps(self.trainer), h.warmup_fraction, h.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class OptimizerTime(pl.Callback):
    """Time of the optimizer update: from the end of backward (on_before_optimizer_step) to the
    end of the batch (the update, the scheduler step and Lightning's bookkeeping, alike for all)."""

    def __init__(self):
        self.times, self.steps, self._start = [], [], None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)
            self.steps.append(trainer.global_step - 1)
            self._start = None


def reference_state_bytes(optimizer, params) -> int:
    """galore_torch keeps its basis inside a projector object in the state: count it too."""
    chosen, total = {id(p) for p in params}, 0
    for p, state in optimizer.state.items():
        if id(p) not in chosen:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif hasattr(value, "ortho_matrix") and isinstance(value.ortho_matrix, torch.Tensor):
                total += value.ortho_matrix.numel() * value.ortho_matrix.element_size()
    return total


def run_one(method: str, steps: int, root: str, seed: int = 0) -> dict:
    pl.seed_everything(seed, verbose=False)
    options = METHODS[method]
    model, data = pydoc_llama(seed, ReferenceGaLoreLM if options == "reference" else None)
    measure, opt_time = Measure(), OptimizerTime()
    galore = [GaLore(**{"rank": RANK, "update_proj_gap": GAP, "scale": SCALE, **options})] \
        if isinstance(options, dict) else []
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         max_steps=steps, max_epochs=-1, val_check_interval=min(50, steps),
                         check_val_every_n_epoch=None,
                         callbacks=[*galore, opt_time, measure], default_root_dir=root)
    trainer.fit(model, datamodule=data)
    optimizer = trainer.optimizers[0]
    matrices = [t.param for t in select_targets(model, ["all-linear"], kinds=("linear",))]
    if options == "reference":
        projected = reference_state_bytes(optimizer, matrices)
        total = reference_state_bytes(optimizer, list(model.parameters()))
    else:
        projected, total = state_bytes(optimizer, matrices), state_bytes(optimizer)
    refresh = [t for t, s in zip(opt_time.times, opt_time.steps) if s % GAP == 0]
    normal = [t for t, s in zip(opt_time.times, opt_time.steps) if s % GAP != 0]
    best = min(measure.val_losses)
    return {"method": method, "projected_bytes": projected, "total_bytes": total,
            "adamw_projected_bytes": sum(2 * 4 * p.numel() for p in matrices),
            "opt_normal": statistics.median(normal), "opt_refresh": statistics.median(refresh) if refresh else None,
            "opt_mean": statistics.mean(opt_time.times), "step": statistics.median(measure.step_times),
            "best": best, "best_step": measure.val_steps[measure.val_losses.index(best)]}


def print_table(results: list[dict], steps: int, seed: int) -> None:
    base = next((r for r in results if r["method"] == "AdamW"), results[0])
    print(f"\npydoc Llama (d 256, 4 layers), {steps} steps, seed {seed}, rank {RANK}, gap {GAP}, "
          f"scale {SCALE}, {torch.get_num_threads()} thread(s)")
    print("| method | state of projected matrices vs AdamW | whole optimizer state (MiB) | optimizer update: ordinary "
          "/ refresh (ms) | amortised update vs AdamW | step time vs AdamW | best val loss (step) | vs AdamW |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        refresh = "-" if r["opt_refresh"] is None else f"{r['opt_refresh'] * 1000:.0f}"
        print(f"| {r['method']} | {r['projected_bytes'] / r['adamw_projected_bytes']:.3f} | "
              f"{r['total_bytes'] / 2**20:.2f} | "
              f"{r['opt_normal'] * 1000:.1f} / {refresh} | {r['opt_mean'] / base['opt_mean']:.2f} | "
              f"{r['step'] / base['step']:.3f} | {r['best']:.4f} ({r['best_step']}) | "
              f"{(r['best'] / base['best'] - 1) * 100:+.1f}% |")


def print_summary(by_seed: dict[int, list[dict]], steps: int) -> None:
    """Each method's best validation loss per seed, its mean and the mean's distance to AdamW's."""
    seeds = list(by_seed)
    runs = {s: {r["method"]: r for r in results} for s, results in by_seed.items()}
    methods = list(runs[seeds[0]])
    reference = "AdamW" if "AdamW" in methods else methods[0]
    best = {m: [runs[s][m]["best"] for s in seeds] for m in methods}
    mean = {m: statistics.mean(v) for m, v in best.items()}
    base = mean[reference]
    update = {m: statistics.mean(runs[s][m]["opt_mean"] / runs[s][reference]["opt_mean"] for s in seeds)
              for m in methods}
    print(f"\npydoc Llama, {steps} steps, best validation loss over seeds {', '.join(map(str, seeds))}")
    print("| method | amortised update vs AdamW | " + " | ".join(f"seed {s}" for s in seeds)
          + " | mean best val loss | mean vs AdamW |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")
    for m in methods:
        print(f"| {m} | {update[m]:.2f} | " + " | ".join(f"{v:.4f}" for v in best[m]) + f" | {mean[m]:.4f} | "
              f"{(mean[m] / base - 1) * 100:+.2f}% |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", "--seed", nargs="+", type=int, default=[0],
                        help="model initialisation and data order; each seed runs every method")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 4
    torch.set_num_threads(args.threads)
    if "galore_torch" in args.methods:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore_torch is not installed (pip install galore-torch): leaving it out")
            args.methods.remove("galore_torch")
    by_seed = {}
    for seed in args.seeds:
        results = []
        for method in args.methods:
            r = run_one(method, args.steps, args.root, seed)
            results.append(r)
            refresh_ms = 0 if r["opt_refresh"] is None else r["opt_refresh"] * 1000
            print(f"{method}, seed {seed}: best val {r['best']:.4f} at {r['best_step']}, "
                  f"projected state {r['projected_bytes'] / 2**20:.2f} MiB, "
                  f"opt {r['opt_normal'] * 1000:.1f} ms (refresh {refresh_ms:.0f} ms), "
                  f"step {r['step'] * 1000:.0f} ms", flush=True)
        print_table(results, args.steps, seed)
        by_seed[seed] = results
    if len(by_seed) > 1:
        print_summary(by_seed, args.steps)


if __name__ == "__main__":
    main()
