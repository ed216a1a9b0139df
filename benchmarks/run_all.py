"""Run every technique benchmark, one after the other, and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py                    # every benchmark at its method-card settings (hours, one CPU)
    python benchmarks/run_all.py --only galore sparcl
    python benchmarks/run_all.py --quick            # smoke test of every script (minutes); numbers mean nothing
    python benchmarks/run_all.py --report-only      # rebuild RESULTS.md and the plots from the saved logs

Each benchmark runs alone in its own process (never two at once: they measure wall time) and its
whole output goes to ``benchmarks/logs/<name>.txt``, headed by the command, the date and the
machine. The report takes the last table each benchmark printed — its side-by-side table — and
draws one PNG per benchmark: the cost column and the quality column of that table, side by side.
A benchmark without a log is listed as not run; a log from ``--quick`` is marked as a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOGS = HERE / "logs"
RESULTS = HERE / "RESULTS.md"
FIGURES = HERE / "figures"


@dataclass(frozen=True)
class Benchmark:
    """One entry of the report.

    Attributes:
        script: the benchmark file in ``benchmarks/``.
        args: its arguments at the method card's settings.
        question: what the table answers.
        card: the method card that discusses the numbers.
        cost: the column of the table plotted as cost (a ratio to the baseline, lower is better).
        quality: the column plotted as quality.
        curves: the script takes ``--json PATH`` and stores each run's ``step_times``, ``val_steps``
            and ``val_losses`` there: the report also plots validation loss against wall-clock time.
    """

    script: str
    args: tuple[str, ...]
    question: str
    card: str
    cost: str
    quality: str
    curves: bool = False


BENCHMARKS = {
    "sparse_vit": Benchmark("sparse_training.py", ("--tasks", "vit", "--seeds", "0", "1", "2"),
                            "Sparse training on the digits ViT: accuracy and FLOPs of GraNet, RigL, SET, N:M and "
                            "Lightning's ModelPruning at 80/90%", "docs/methods/sparse_training_results.md",
                            "training FLOPs", "val acc %", curves=True),
    "sparse_lm": Benchmark("sparse_training.py", ("--tasks", "lm", "--steps", "600", "--seeds", "0", "--update-every",
                                                  "20st"),
                           "Sparse training on the pydoc LM (600 steps)", "docs/methods/sparse_training_results.md",
                           "training FLOPs", "best val loss", curves=True),
    "freezing_vit8": Benchmark("progressive_freezing.py", ("--task", "vit8", "--epochs", "40", "--seeds", "0", "1", "2"),
                               "Progressive freezing on the 8×8 digits ViT: wall-clock saved and accuracy",
                               "docs/methods/progressive_freezing.md", "fit time vs baseline", "val acc %", curves=True),
    "freezing_vit8_cached": Benchmark("progressive_freezing.py", ("--task", "vit8", "--epochs", "40", "--seeds", "0", "1", "2",
                                                                  "3", "4", "--methods", "baseline", "freezeout",
                                                                  "freezeout cached"),
                                      "FreezeOut with and without the frozen-output cache on the 8×8 digits ViT, 5 seeds",
                                      "docs/methods/progressive_freezing.md", "fit time vs baseline", "val acc %",
                                      curves=True),
    "freezing_vit8_turns": Benchmark("progressive_freezing.py", ("--task", "vit8", "--epochs", "40", "--seeds", "0", "1", "2",
                                                                 "3", "4", "--turns", "0.5", "--methods", "baseline",
                                                                 "freezeout", "freezeout cached"),
                                     "FreezeOut with and without the frozen-output cache on the 8×8 digits ViT, 5 seeds, "
                                     "each seed's runs taking turns on the machine in 0.5 s slices",
                                     "docs/methods/progressive_freezing.md", "fit time vs baseline", "val acc %",
                                     curves=True),
    "freezing_vit32_cached": Benchmark("progressive_freezing.py", ("--task", "vit32", "--epochs", "40", "--seeds", "0", "1",
                                                                   "2", "--threads", "2", "--methods", "baseline",
                                                                   "freezeout", "freezeout cached"),
                                       "FreezeOut with and without the frozen-output cache on the 32×32 digits ViT "
                                       "(40 epochs), 3 seeds", "docs/methods/progressive_freezing.md",
                                       "fit time vs baseline", "val acc %", curves=True),
    "freezing_lm_alone": Benchmark("progressive_freezing.py", ("--task", "lm", "--epochs", "600", "--seeds", "0",
                                                               "--threads", "2", "--methods", "baseline",
                                                               "freezeout cached", "freezeout t0 0.75 cached"),
                                   "Cached FreezeOut on the pydoc LM (600 steps), the machine to itself (2 threads)",
                                   "docs/methods/progressive_freezing.md", "fit time vs baseline", "best val loss",
                                   curves=True),
    "freezing_lm": Benchmark("progressive_freezing.py", ("--task", "lm", "--epochs", "600", "--seeds", "0", "--methods",
                                                         "baseline", "freezeout", "freezeout cached",
                                                         "freezeout t0 0.7 cached"),
                             "Progressive freezing on the pydoc LM (600 steps, past its over-fitting point)",
                             "docs/methods/progressive_freezing.md", "fit time vs baseline", "best val loss", curves=True),
    "loss_reweighting_vit": Benchmark("loss_reweighting.py", ("--task", "vit", "--seeds", "0", "1", "2", "--threads", "2"),
                                      "Loss reweighting on the digits ViT: steps to the baseline's validation loss",
                                      "docs/methods/loss_reweighting.md",
                                      "step reaching the baseline's final (fraction of the baseline's)", "val acc %"),
    "loss_reweighting_lm_stdlib_docstrings": Benchmark(
        "loss_reweighting.py", ("--task", "lm", "--corpus", "stdlib_docstrings", "--seeds", "0", "--methods", "uniform",
                                "linupper", "--threads", "1"),
        "LinUpper on the larger, mixed standard-library docstring corpus (600 steps = 2.3 passes)",
        "docs/methods/loss_reweighting.md", "step reaching the baseline's final (fraction of the baseline's)",
        "best val loss"),
    "loss_reweighting_lm_stdlib_docstrings_seed_1": Benchmark(
        "loss_reweighting.py", ("--task", "lm", "--corpus", "stdlib_docstrings", "--seeds", "1", "--methods", "uniform",
                                "linupper", "--threads", "1"),
        "LinUpper on the standard-library docstring corpus, a second seed",
        "docs/methods/loss_reweighting.md", "step reaching the baseline's final (fraction of the baseline's)",
        "best val loss"),
    "infobatch": Benchmark("infobatch.py", ("--seeds", "0", "1", "2", "3", "4", "--same-budget", "--threads", "2"),
                           "InfoBatch on the digits ViT: samples skipped, time and accuracy, with a same-steps control",
                           "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_120_epochs": Benchmark("infobatch.py", ("--seeds", "0", "1", "2", "3", "4", "--epochs", "120", "--same-budget",
                                                       "--threads", "1"),
                                      "InfoBatch on the digits ViT trained 3x longer (120 epochs, converged)",
                                      "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_120_epochs_seeds_5_9": Benchmark("infobatch.py", ("--seeds", "5", "6", "7", "8", "9", "--epochs", "120",
                                                                 "--same-budget", "--threads", "1"),
                                                "InfoBatch on the digits ViT at 120 epochs, five more seeds",
                                                "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_ablations": Benchmark("infobatch.py", ("--seeds", "0", "1", "2", "3", "4", "--same-budget", "--ablations",
                                                      "--threads", "1"),
                                     "InfoBatch without rescaling, random pruning, and its data order alone (40 epochs)",
                                     "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_fashion_mnist": Benchmark("infobatch.py", ("--task", "fashion_mnist", "--train-subset", "10000", "--epochs",
                                                          "20", "--seeds", "0", "1", "--same-budget", "--threads", "1"),
                                         "InfoBatch on Fashion-MNIST (28x28 ViT, 10k training images, 10k validation)",
                                         "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_fashion_mnist_seeds_2_3": Benchmark("infobatch.py", ("--task", "fashion_mnist", "--train-subset", "10000",
                                                                    "--epochs", "20", "--seeds", "2", "3", "--same-budget",
                                                                    "--threads", "1"),
                                                   "InfoBatch on Fashion-MNIST, two more seeds",
                                                   "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "infobatch_fashion_mnist_40_epochs": Benchmark("infobatch.py", ("--task", "fashion_mnist", "--train-subset", "10000",
                                                                    "--epochs", "40", "--seeds", "0", "--same-budget",
                                                                    "--threads", "1"),
                                                   "InfoBatch on Fashion-MNIST at 40 epochs (one seed)",
                                                   "docs/methods/infobatch.md", "fit time vs baseline", "final val acc %"),
    "galore": Benchmark("galore.py", ("--steps", "300", "--threads", "2"),
                        "GaLore on the pydoc LM: optimizer memory, update time and validation loss vs AdamW and "
                        "galore_torch", "docs/methods/galore.md", "state of projected matrices vs AdamW",
                        "best val loss (step)"),
    "sparcl": Benchmark("sparcl.py", ("--seeds", "0", "1", "2", "3", "4", "--threads", "2"),
                        "SparCL on Split-digits (5 tasks): continual accuracy, forgetting and training FLOPs",
                        "docs/methods/sparcl.md", "training FLOPs vs dense DER++", "Class-IL avg acc %"),
    "sparcl_ablations": Benchmark("sparcl.py", ("--seeds", "0", "1", "2", "3", "4", "--threads", "2", "--methods", "DER++",
                                                "SparCL-DER++ 90%", "SparCL-DER++ 90%, no DDR",
                                                "SparCL-DER++ 90%, no TDM"),
                                  "SparCL at 90% without data removal / without mask updates (static magnitude masks)",
                                  "docs/methods/sparcl.md", "training FLOPs vs dense DER++", "Class-IL avg acc %"),
    "sparcl_long_tasks": Benchmark("sparcl.py", ("--seeds", "0", "1", "2", "3", "4", "--threads", "2", "--epochs-per-task", "50",
                                                 "--methods", "DER++", "SparCL-DER++ 75%", "SparCL-DER++ 90%"),
                                   "SparCL on Split-digits with the paper's 50-epoch tasks (its schedule unscaled)",
                                   "docs/methods/sparcl.md", "training FLOPs vs dense DER++", "Class-IL avg acc %"),
    "sparcl_long_tasks_seeds_5_9": Benchmark("sparcl.py", ("--seeds", "5", "6", "7", "8", "9", "--threads", "2",
                                                           "--epochs-per-task", "50", "--methods", "DER++",
                                                           "SparCL-DER++ 90%"),
                                             "SparCL at 90% with the paper's 50-epoch tasks, five more seeds",
                                             "docs/methods/sparcl.md", "training FLOPs vs dense DER++",
                                             "Class-IL avg acc %"),
}


# -- running ----------------------------------------------------------------------------------------


def header(command: list[str], quick: bool) -> str:
    import torch

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}"
    kind = "QUICK SMOKE TEST (numbers mean nothing)" if quick else "full run"
    return f"# command: {shlex.join(command)}\n# date: {when}\n# machine: {machine}\n# kind: {kind}\n"


def run(name: str, quick: bool) -> float:
    bench = BENCHMARKS[name]
    command = [sys.executable, str(HERE / bench.script), *(("--quick",) if quick else bench.args)]
    if bench.curves:
        command += ["--json", os.path.relpath(LOGS / f"{name}.json", ROOT)]  # the script runs in ROOT
    LOGS.mkdir(exist_ok=True)
    start = time.perf_counter()
    with open(LOGS / f"{name}.txt", "w") as log:
        shown = ["python", f"benchmarks/{bench.script}", *command[2:]]
        log.write(header(shown, quick))
        log.flush()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    elapsed = time.perf_counter() - start
    with open(LOGS / f"{name}.txt", "a") as log:
        log.write(f"# exit {code} after {elapsed:.0f} s\n")
    return elapsed


# -- reporting --------------------------------------------------------------------------------------


def last_table(text: str) -> list[str]:
    """The last markdown table in ``text`` (its lines), or [] if there is none."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables[-1] if tables else []


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def number(cell: str) -> Optional[float]:
    """The value a cell reports: the ratio in parentheses if there is one, else its first number."""
    inside = re.search(r"\(\s*(-?\d+(?:\.\d+)?)", cell)
    match = inside or re.search(r"-?\d+(?:\.\d+)?", cell)
    return float(match.group(1) if inside else match.group(0)) if match else None


def log_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# (command|date|machine|kind|note): (.*)$", text, re.M))


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported here: only reports need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(figure, filename: str) -> Path:
    """Lay out ``figure``, write it to ``FIGURES/filename`` and free it."""
    figure.tight_layout()
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / filename
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def plot(name: str, bench: Benchmark, table: list[str]) -> Optional[Path]:
    """A PNG with the cost and the quality column of ``table`` as horizontal bars, or None."""
    plt = pyplot()
    head = cells(table[0])
    if bench.cost not in head or bench.quality not in head:
        return None
    rows = [cells(line) for line in table[2:]]
    labels = [f"{r[0]} {r[1]}" if head[1] == "sparsity" else r[0] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.4), sharey=True)
    for ax, column, colour in ((axes[0], bench.cost, "tab:orange"), (axes[1], bench.quality, "tab:blue")):
        values = [number(r[head.index(column)]) for r in rows]
        ax.barh(range(len(rows)), [v if v is not None else 0.0 for v in values], color=colour)
        ax.set_title(column, fontsize=9)
        for i, v in enumerate(values):
            ax.text(v or 0.0, i, f" {v:g}" if v is not None else " –", va="center", fontsize=8)
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(bench.question, fontsize=9)
    return save(figure, f"{name}.png")


def plot_curves(name: str, runs: list[dict]) -> Optional[Path]:
    """Validation loss against cumulative training wall time, one line per method (the mean over its
    seeds), or None without curves."""
    plt = pyplot()
    runs = [r for r in runs if r.get("val_steps") and r.get("step_times")]
    if not runs:
        return None
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(" ".join(str(r[k]) for k in ("method", "sparsity") if r.get(k) is not None), []).append(r)
    figure, ax = plt.subplots(figsize=(7, 4))
    for label, members in groups.items():
        points = min(len(r["val_steps"]) for r in members)
        elapsed = [[sum(r["step_times"][:step]) for step in r["val_steps"][:points]] for r in members]
        losses = [r["val_losses"][:points] for r in members]
        mean = lambda rows: [sum(column) / len(column) for column in zip(*rows)]  # noqa: E731
        seeds = f" ({len(members)} seeds)" if len(members) > 1 else ""
        ax.plot(mean(elapsed), mean(losses), marker=".", label=label + seeds)
    ax.set_xlabel("training wall time (s, steps only)")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    return save(figure, f"{name}_curves.png")


def report() -> str:
    parts = ["# Benchmark results", "",
             "Written by `python benchmarks/run_all.py` from the logs in `benchmarks/logs/` (rebuild with "
             "`--report-only`). Every figure was measured on the machine named under each table — this project's "
             "2-core CPU machines unless it says otherwise — with every method of a table run in one process, side "
             "by side, so ratios compare like with like; absolute times do not transfer to other hardware. The "
             "method cards discuss each table. The GPU check (`benchmarks/gpu_check.py`: every callback on CUDA in "
             "bf16-mixed and 16-mixed, syncs per step, 8-bit states, the 2:4 export, GaLore's peak memory) needs a CUDA "
             "machine and is not run from here; no GPU has been lent to this project yet, so its table is not in this "
             "file.", ""]
    for name, bench in BENCHMARKS.items():
        parts += [f"## {name}: {bench.question}", ""]
        log = LOGS / f"{name}.txt"
        if not log.exists():
            parts += [f"Not run yet: `python benchmarks/run_all.py --only {name}`. See [{Path(bench.card).name}]"
                      f"(../{bench.card}) for earlier measurements.", ""]
            continue
        text = log.read_text()
        fields, table = log_fields(text), last_table(text)
        parts += [f"`{fields.get('command', '?')}` — {fields.get('date', '?')}, {fields.get('machine', '?')}"
                  f"{' — **' + fields['kind'] + '**' if 'QUICK' in fields.get('kind', '') else ''}"
                  f"{' (' + fields['note'] + ')' if 'note' in fields else ''}", ""]
        if not table:
            parts += ["The log holds no table (the run failed or was cut short).", ""]
            continue
        parts += [*table, ""]
        figure = plot(name, bench, table)
        if figure is not None:
            parts += [f"![{name}](figures/{figure.name})", ""]
        runs = LOGS / f"{name}.json"
        curves = plot_curves(name, json.loads(runs.read_text())) if runs.exists() else None
        if curves is not None:
            parts += [f"![{name}: validation loss against wall time](figures/{curves.name})", ""]
        parts += [f"Discussed in [{Path(bench.card).name}](../{bench.card}).", ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        for name in args.only or list(BENCHMARKS):
            print(f"{name}: running", flush=True)
            print(f"{name}: {run(name, args.quick):.0f} s", flush=True)
    RESULTS.write_text(report())
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
