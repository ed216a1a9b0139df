"""Loss reweighting benchmark: does LinUpper reach the plain mean's validation loss in fewer steps?

    python benchmarks/loss_reweighting.py --task vit --seeds 0 1 2     # 8x8 digits ViT, 40 epochs, ~1 min a run
    python benchmarks/loss_reweighting.py --task lm --seeds 0          # pydoc LM, 600 steps, val every 25
    python benchmarks/loss_reweighting.py --quick                      # smoke test

Side by side in one process, same steps and seeds: ``uniform`` (the plain mean, no callback: the baseline) vs
LossReweighting ``linupper``, ``quadratic`` and ``extremes`` (r = 1.0, plain mean for the first 5%).
Reported: best validation loss, the step at which each method first reaches the baseline's best
validation loss (and that as a fraction of the baseline's own step), final validation accuracy
(ViT), and the median step time relative to the baseline. The validation curves go to a PNG.
The tasks are the standard ones: the 8x8 digits ViT (AdamW 3e-3, batch 64) and the pydoc Llama
(AdamW 1e-3, batch 16 x 128, cosine with 5% warm-up).
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

from benchmarks.common import Measure, add_common_arguments, mean_std, pydoc_llama  # noqa: E402
from examples.vision.data import DigitsDataModule  # noqa: E402
from examples.vision.vit import ViTClassifier  # noqa: E402
from lit_efficient import LossReweighting  # noqa: E402

METHODS = ("uniform", "linupper", "quadratic", "extremes")


def run_one(task: str, method: str, seed: int, length: int, root: str, temperature: float,
            max_steps: int = -1, corpus: str = "pydoc") -> dict:
    pl.seed_everything(seed, verbose=False)
    if task == "lm":
        model, data = pydoc_llama(seed, corpus=corpus)
        limits = {"max_steps": length, "max_epochs": -1, "val_check_interval": 25, "check_val_every_n_epoch": None}
    else:
        model = ViTClassifier(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=2.0, lr=3e-3, weight_decay=0.05)
        data = DigitsDataModule(batch_size=64, seed=seed)
        limits = {"max_epochs": length, "max_steps": max_steps}
    measure = Measure()
    # the baseline is plain training, no callback at all: the step-time ratio is the whole overhead
    reweighting = ([] if method == "uniform"
                   else [LossReweighting(strategy=method, temperature=temperature, warmup=0.05)])
    callbacks = [*reweighting, measure]
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks, default_root_dir=root, **limits)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    acc = trainer.callback_metrics.get("val/acc")
    return {"method": method, "seed": seed, "fit": time.perf_counter() - start, "curve": measure.val_losses,
            "steps": measure.val_steps, "step_time": statistics.median(measure.step_times[5:] or measure.step_times),
            "acc": None if acc is None else float(acc) * 100}


def overhead(task: str, rounds: int, steps: int, root: str) -> None:
    """Per-step cost of LinUpper vs plain training, interleaved in short chunks so the machine's
    drifts hit both alike; reports the median and spread of the paired ratios."""
    ratios = []
    for i in range(rounds):
        pair = {}
        for method in ("uniform", "linupper") if i % 2 == 0 else ("linupper", "uniform"):
            r = run_one(task, method, 0, 1000, root, 1.0, max_steps=steps) if task == "vit" else \
                run_one(task, method, 0, steps, root, 1.0)
            pair[method] = r["step_time"]
        ratios.append(pair["linupper"] / pair["uniform"])
    ratios.sort()
    q = lambda f: ratios[min(len(ratios) - 1, int(f * len(ratios)))]  # noqa: E731
    print(f"\n{task}: LinUpper step time / plain step time over {rounds} interleaved chunks of {steps} steps: "
          f"median {statistics.median(ratios):.3f} (quartiles {q(0.25):.3f}-{q(0.75):.3f})")


def first_reaching(run: dict, target: float):
    return next((s for s, v in zip(run["steps"], run["curve"]) if v <= target), None)


def plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("black", "tab:blue", "tab:orange", "tab:green")))
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        n = min(len(r["curve"]) for r in runs)
        mean = [statistics.mean(r["curve"][i] for r in runs) for i in range(n)]
        ax.plot(runs[0]["steps"][:n], mean, label=method, color=colours[method])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("vit", "lm"), default="vit")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--length", type=int, default=None, help="epochs (vit, default 40) or steps (lm, default 600)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--corpus", choices=("pydoc", "stdlib_docstrings"), default="pydoc",
                        help="LM text: pydoc (the standard task) or every standard-library docstring (larger, mixed)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--plot", default=None, help="PNG path (default docs/methods/loss_reweighting_<task>.png)")
    parser.add_argument("--overhead", type=int, default=0, metavar="ROUNDS",
                        help="only measure the step-time overhead, in this many interleaved chunks")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    length = args.length or (40 if args.task == "vit" else 600)
    if args.quick:
        args.seeds, length = args.seeds[:1], 2 if args.task == "vit" else 50
    torch.set_num_threads(args.threads)
    run_one(args.task, "uniform", 0, 1 if args.task == "vit" else 25, args.root, 1.0)  # untimed warm-up
    if args.overhead:
        overhead(args.task, args.overhead, 60 if args.task == "vit" else 30, args.root)
        return
    results = []
    for seed in args.seeds:
        for method in args.methods:
            r = run_one(args.task, method, seed, length, args.root, args.temperature, corpus=args.corpus)
            results.append(r)
            best = min(r["curve"])
            print(f"[seed {seed}] {method}: best val loss {best:.4f} at step {r['steps'][r['curve'].index(best)]}, "
                  f"step {r['step_time'] * 1000:.1f} ms, fit {r['fit']:.1f}s", flush=True)
    base = {r["seed"]: r for r in results if r["method"] == "uniform"}
    unit = f"{length} epochs" if args.task == "vit" else f"{length} steps, {args.corpus}"
    print(f"\n{args.task}, {unit}, r = {args.temperature}, seeds {args.seeds}, {torch.get_num_threads()} thread(s)")
    print("| method | best val loss | final val loss | step reaching the baseline's final (fraction of the baseline's) "
          "| step reaching the baseline's best (fraction) | val acc % | step time vs baseline |")
    print("|---|---|---|---|---|---|---|")

    def reaching(runs: list[dict], pick) -> str:
        fractions, reached = [], []
        for r in runs:
            target = pick(base[r["seed"]]["curve"])
            step, own = first_reaching(r, target), first_reaching(base[r["seed"]], target)
            reached.append(step)
            fractions.append(None if step is None else step / own)
        missing = sum(s is None for s in reached)
        note = f" ({missing} of {len(runs)} never)" if missing else ""
        return f"{mean_std(reached, digits=0)} ({mean_std(fractions, digits=2)}){note}"

    for method in args.methods:
        runs = [r for r in results if r["method"] == method]
        print(f"| {method} | {mean_std([min(r['curve']) for r in runs], digits=4)} | "
              f"{mean_std([r['curve'][-1] for r in runs], digits=4)} | {reaching(runs, lambda c: c[-1])} | "
              f"{reaching(runs, min)} | {mean_std([r['acc'] for r in runs])} | "
              f"{mean_std([r['step_time'] / base[r['seed']]['step_time'] for r in runs], digits=3)} |")
    if args.methods == list(METHODS) and not args.quick:
        corpus = "" if args.corpus == "pydoc" else "_" + args.corpus
        path = args.plot or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "methods",
                                         f"loss_reweighting_{args.task}{corpus}.png")
        plot(results, path, f"LossReweighting, {args.task}, {unit}, r = {args.temperature}")
        print(f"curves: {path}")


if __name__ == "__main__":
    main()
