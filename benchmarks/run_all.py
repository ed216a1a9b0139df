"""Run every technique benchmark, one after the other, and write ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py                # every benchmark at its method-card settings (hours, one CPU)
    python benchmarks/run_all.py --only galore sparcl
    python benchmarks/run_all.py --quick        # smoke test of every script (minutes), in benchmarks/logs/quick/
    python benchmarks/run_all.py --report-only  # rebuild RESULTS.md and the plots from the saved logs
    python benchmarks/run_all.py --plan --quick # print what would run and where it would write; run nothing

Each benchmark runs alone in its own process (never two at once: they measure wall time) and its
whole output goes to ``benchmarks/logs/<name>.txt``, headed by the command, the date and the
machine. The report takes the last table each benchmark printed — its side-by-side table — and
draws one PNG per benchmark: the cost column and the quality column of that table, side by side.
A benchmark without a log is listed as not run.

``--quick`` runs each script once with its own ``--quick`` settings (numbers mean nothing) and writes
its logs, figures and report into a folder of its own (``--out``, default ``benchmarks/logs/quick/``):
it never touches the committed logs, figures or ``benchmarks/RESULTS.md``. ``--out`` also sends a full
run elsewhere; the report goes beside the logs unless they are the committed ones.
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
    """One entry of the report: one process, one log.

    Attributes:
        script: the benchmark file in ``benchmarks/``.
        args: its arguments at the method card's settings (``--seeds`` included).
        question: what the table answers.
        card: the method card that discusses the numbers.
        cost: the column of the table plotted as cost (a ratio to the baseline, lower is better).
        quality: the column plotted as quality.
        curves: the script takes ``--json PATH`` and stores each run's ``step_times``, ``val_steps``
            and ``val_losses`` there: the report also plots validation loss against wall-clock time.
        every_table: the report shows the log's tables from the first whose header names ``cost``
            to the last (its plot still reads the last one); by default only the last.
    """

    script: str
    args: tuple[str, ...]
    question: str
    card: str
    cost: str
    quality: str
    curves: bool = False
    every_table: bool = False


@dataclass(frozen=True)
class Study:
    """One row of the registry: a benchmark at one setting, run once per group of seeds.

    Each group of ``seeds`` is one process and one log (``--seeds`` followed by the group): the first
    is logged as ``name``, each further one as ``name_seed_<s>`` (one seed) or ``name_seeds_<first>_<last>``.
    ``seeds=()`` is for a script that takes no ``--seeds``. The other fields are :class:`Benchmark`'s.
    """

    name: str
    script: str
    args: tuple[str, ...]
    seeds: tuple[tuple[int, ...], ...]
    question: str
    card: str
    cost: str
    quality: str
    curves: bool = False
    every_table: bool = False

    def expand(self) -> dict[str, Benchmark]:
        """One :class:`Benchmark` per group of seeds, by log name, in the order of the groups."""
        out = {}
        for i, group in enumerate(self.seeds or ((),)):
            name, question = self.name, self.question
            if i:
                if len(group) == 1:
                    name, question = f"{name}_seed_{group[0]}", f"{question}, seed {group[0]}"
                else:
                    contiguous = list(group) == list(range(group[0], group[-1] + 1))
                    listed = f"{group[0]}–{group[-1]}" if contiguous else ", ".join(map(str, group))
                    name, question = f"{name}_seeds_{group[0]}_{group[-1]}", f"{question}, seeds {listed}"
            seeds = ("--seeds", *map(str, group)) if group else ()
            out[name] = Benchmark(self.script, (*self.args, *seeds), question, self.card, self.cost, self.quality,
                                  self.curves, self.every_table)
        return out


SPARSE_CARD = "docs/methods/sparse_training_results.md"
FREEZING_CARD = "docs/methods/progressive_freezing.md"
REWEIGHTING_CARD = "docs/methods/loss_reweighting.md"
INFOBATCH_CARD = "docs/methods/infobatch.md"
SPARCL_CARD = "docs/methods/sparcl.md"
FIT_TIME = "fit time vs baseline"
STEPS_TO_BASELINE = "step reaching the baseline's final (fraction of the baseline's)"
SPARCL_FLOPS = "training FLOPs vs dense DER++"
FIVE, NEXT_FIVE = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)

# Every run of the report: one row per setting; its groups of seeds expand into one log each (see Study).
REGISTRY = (
    Study("sparse_vit", "sparse_training.py", ("--tasks", "vit"), ((0, 1, 2),),
          "Sparse training on the digits ViT: accuracy and FLOPs of GraNet, RigL, SET, N:M and Lightning's "
          "ModelPruning at 80/90%", SPARSE_CARD, "training FLOPs", "val acc %", curves=True),
    Study("sparse_vit_granet_growth", "sparse_training.py",
          ("--tasks", "vit", "--sparsities", "0.9", "--methods", "dense", "granet", "granet_momentum"), ((0, 1, 2),),
          "GraNet's regrowth on the digits ViT at 90%: by gradient (default) or by the dense gradients' momentum",
          SPARSE_CARD, "training FLOPs", "val acc %"),
    Study("sparse_lm", "sparse_training.py", ("--tasks", "lm", "--steps", "600", "--update-every", "20st"), ((0,),),
          "Sparse training on the pydoc LM (600 steps)", SPARSE_CARD, "training FLOPs", "best val loss", curves=True),
    Study("freezing_vit8", "progressive_freezing.py", ("--task", "vit8", "--epochs", "40"), ((0, 1, 2),),
          "Progressive freezing on the 8×8 digits ViT: wall-clock saved and accuracy", FREEZING_CARD, FIT_TIME,
          "val acc %", curves=True),
    Study("freezing_vit8_cached", "progressive_freezing.py",
          ("--task", "vit8", "--epochs", "40", "--methods", "baseline", "freezeout", "freezeout cached"), (FIVE,),
          "FreezeOut with and without the frozen-output cache on the 8×8 digits ViT, 5 seeds", FREEZING_CARD,
          FIT_TIME, "val acc %", curves=True),
    Study("freezing_vit8_turns", "progressive_freezing.py",
          ("--task", "vit8", "--epochs", "40", "--turns", "0.5", "--methods", "baseline", "freezeout",
           "freezeout cached"), (FIVE,),
          "FreezeOut with and without the frozen-output cache on the 8×8 digits ViT, 5 seeds, each seed's runs "
          "taking turns on the machine in 0.5 s slices", FREEZING_CARD, FIT_TIME, "val acc %", curves=True),
    Study("freezing_vit32_cached", "progressive_freezing.py",
          ("--task", "vit32", "--epochs", "40", "--threads", "2", "--methods", "baseline", "freezeout",
           "freezeout cached"), ((0, 1, 2),),
          "FreezeOut with and without the frozen-output cache on the 32×32 digits ViT (40 epochs), 3 seeds",
          FREEZING_CARD, FIT_TIME, "val acc %", curves=True),
    Study("freezing_lm_alone", "progressive_freezing.py",
          ("--task", "lm", "--epochs", "600", "--threads", "2", "--methods", "baseline", "freezeout cached",
           "freezeout t0 0.75 cached"), ((0,),),
          "Cached FreezeOut on the pydoc LM (600 steps), the machine to itself (2 threads)", FREEZING_CARD,
          FIT_TIME, "best val loss", curves=True),
    Study("freezing_lm", "progressive_freezing.py",
          ("--task", "lm", "--epochs", "600", "--methods", "baseline", "freezeout", "freezeout cached",
           "freezeout t0 0.7 cached"), ((0,),),
          "Progressive freezing on the pydoc LM (600 steps, past its over-fitting point)", FREEZING_CARD,
          FIT_TIME, "best val loss", curves=True),
    Study("loss_reweighting_vit", "loss_reweighting.py", ("--task", "vit", "--threads", "2"), ((0, 1, 2),),
          "Loss reweighting on the digits ViT: steps to the baseline's validation loss", REWEIGHTING_CARD,
          STEPS_TO_BASELINE, "val acc %"),
    Study("loss_reweighting_lm_stdlib_docstrings", "loss_reweighting.py",
          ("--task", "lm", "--corpus", "stdlib_docstrings", "--methods", "uniform", "linupper", "--threads", "1"),
          ((0,), (1,)),
          "LinUpper on the larger, mixed standard-library docstring corpus (600 steps = 2.3 passes)",
          REWEIGHTING_CARD, STEPS_TO_BASELINE, "best val loss"),
    Study("infobatch", "infobatch.py", ("--same-budget", "--threads", "2"), (FIVE,),
          "InfoBatch on the digits ViT: samples skipped, time and accuracy, with a same-steps control",
          INFOBATCH_CARD, FIT_TIME, "final val acc %"),
    Study("infobatch_120_epochs", "infobatch.py", ("--epochs", "120", "--same-budget", "--threads", "1"),
          (FIVE, NEXT_FIVE),
          "InfoBatch on the digits ViT trained 3x longer (120 epochs, converged)", INFOBATCH_CARD, FIT_TIME,
          "final val acc %"),
    Study("infobatch_ablations", "infobatch.py", ("--same-budget", "--ablations", "--threads", "1"), (FIVE,),
          "InfoBatch without rescaling, random pruning, and its data order alone (40 epochs)", INFOBATCH_CARD,
          FIT_TIME, "final val acc %"),
    Study("infobatch_fashion_mnist", "infobatch.py",
          ("--task", "fashion_mnist", "--train-subset", "10000", "--epochs", "20", "--same-budget", "--threads", "1"),
          ((0, 1), (2, 3)),
          "InfoBatch on Fashion-MNIST (28x28 ViT, 10k training images, 10k validation)", INFOBATCH_CARD, FIT_TIME,
          "final val acc %"),
    Study("infobatch_fashion_mnist_40_epochs", "infobatch.py",
          ("--task", "fashion_mnist", "--train-subset", "10000", "--epochs", "40", "--same-budget", "--threads", "1"),
          ((0,),),
          "InfoBatch on Fashion-MNIST at 40 epochs (one seed)", INFOBATCH_CARD, FIT_TIME, "final val acc %"),
    Study("galore", "galore.py", ("--steps", "300", "--threads", "2"), (),
          "GaLore on the pydoc LM: optimizer memory, update time and validation loss vs AdamW and galore_torch",
          "docs/methods/galore.md", "state of projected matrices vs AdamW", "best val loss (step)"),
    Study("galore_moments_on_refresh", "galore.py",
          ("--steps", "300", "--threads", "2", "--methods", "AdamW", "galore_torch", "GaLore svd keep",
           "GaLore svd align", "GaLore svd rotate", "GaLore svd rotate, scale 1"), ((0, 1, 2),),
          "GaLore's moments across a basis refresh (keep / align / rotate) vs AdamW and galore_torch, 3 seeds",
          "docs/methods/galore.md", "amortised update vs AdamW", "mean best val loss"),
    Study("galore_ddp_distance", "galore_ddp.py", (), (),
          "GaLore under 2-rank DDP vs one process, per moments_on_refresh (pydoc Llama, 3 refreshes)",
          "docs/methods/galore.md", "largest weight difference", "relative distance of the projected matrices"),
    Study("galore_refresh", "galore_refresh.py", ("--threads", "1"), (),
          "GaLore's basis refresh: time and subspace overlap with the exact SVD, 28 Llama matrices, one thread",
          "docs/methods/galore.md", "time vs Gram eigh", "subspace overlap with exact: mean"),
    Study("fsdp2", "fsdp2.py", ("--val-steps", "200"), (),
          "FSDP2 on the pydoc Llama, 1/2/4 CPU processes: per-rank bytes, bytes sent, step time; GaLore's val loss "
          "sharded vs one process", "docs/methods/galore.md", "state × W / one process's", "best val loss",
          every_table=True),
    Study("communication", "communication.py", (), (),
          "DDP over gloo, 2/4 CPU processes: bytes all-reduced per step and step time, ddp_exact_compression vs plain "
          "DDP vs PowerSGD (GaLore on the pydoc Llama, RigL 90% on the 32×32 ViT); validation at the end",
          "docs/methods/ddp_exact_compression.md", "sent vs plain DDP", "val loss", every_table=True),
    Study("sparcl", "sparcl.py", ("--threads", "2"), (FIVE,),
          "SparCL on Split-digits (5 tasks): continual accuracy, forgetting and training FLOPs", SPARCL_CARD,
          SPARCL_FLOPS, "Class-IL avg acc %"),
    Study("sparcl_ablations", "sparcl.py",
          ("--threads", "2", "--methods", "DER++", "SparCL-DER++ 90%", "SparCL-DER++ 90%, no DDR",
           "SparCL-DER++ 90%, no TDM"), (FIVE,),
          "SparCL at 90% without data removal / without mask updates (static magnitude masks)", SPARCL_CARD,
          SPARCL_FLOPS, "Class-IL avg acc %"),
    Study("sparcl_long_tasks", "sparcl.py",
          ("--threads", "2", "--epochs-per-task", "50", "--methods", "DER++", "SparCL-DER++ 75%", "SparCL-DER++ 90%"),
          (FIVE,),
          "SparCL on Split-digits with the paper's 50-epoch tasks (its schedule unscaled)", SPARCL_CARD,
          SPARCL_FLOPS, "Class-IL avg acc %"),
    # five more seeds of the 50-epoch tasks, for the 90% model only (hence a row of its own)
    Study("sparcl_long_tasks_seeds_5_9", "sparcl.py",
          ("--threads", "2", "--epochs-per-task", "50", "--methods", "DER++", "SparCL-DER++ 90%"), (NEXT_FIVE,),
          "SparCL at 90% with the paper's 50-epoch tasks, five more seeds", SPARCL_CARD, SPARCL_FLOPS,
          "Class-IL avg acc %"),
)
BENCHMARKS = {name: bench for study in REGISTRY for name, bench in study.expand().items()}


# -- running ----------------------------------------------------------------------------------------


def header(command: list[str], quick: bool) -> str:
    import torch

    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, torch {torch.__version__}"
    kind = "QUICK SMOKE TEST (numbers mean nothing)" if quick else "full run"
    return f"# command: {shlex.join(command)}\n# date: {when}\n# machine: {machine}\n# kind: {kind}\n"


@dataclass(frozen=True)
class Run:
    """One benchmark process as planned: its command (run in ROOT) and the files it writes."""

    name: str
    command: tuple[str, ...]
    log: Path
    curves: Optional[Path]  # the --json file of a script with curves


@dataclass(frozen=True)
class Plan:
    """What a call of this script runs and every path it writes."""

    runs: tuple[Run, ...]
    logs: Path
    results: Path
    figures: Path
    quick: bool
    reported: tuple[str, ...]  # the benchmarks the report lists


def plan(only: Optional[list[str]] = None, quick: bool = False, out: Optional[Path] = None) -> Plan:
    """The runs and output paths for ``--only``/``--quick``/``--out``; runs and writes nothing.

    The committed logs folder (``LOGS``) gets the report ``RESULTS`` and the plots in ``FIGURES``; any
    other folder gets its own ``RESULTS.md`` and ``figures/``. ``--quick`` refuses the committed folder
    (and any folder whose report would be ``RESULTS``), and runs each script once: its ``--quick``
    ignores the settings, so two benchmarks of one script would run the same command.
    """
    logs = Path(out).absolute() if out is not None else (LOGS / "quick" if quick else LOGS)
    committed = logs.resolve() == LOGS.resolve()
    results, figures = (RESULTS, FIGURES) if committed else (logs / "RESULTS.md", logs / "figures")
    if quick and (committed or results.resolve() == RESULTS.resolve()):
        raise SystemExit(f"--quick writes smoke tests only into a folder of their own, not {logs}: "
                         f"its logs and report would replace the measured ones")
    names = list(only or BENCHMARKS)
    if quick:
        scripts = {}
        for name in names:
            scripts.setdefault(BENCHMARKS[name].script, name)
        names = list(scripts.values())
    runs = []
    for name in names:
        bench = BENCHMARKS[name]
        command = (sys.executable, str(HERE / bench.script), *(("--quick",) if quick else bench.args))
        curves = logs / f"{name}.json" if bench.curves else None
        if curves is not None:
            command += ("--json", os.path.relpath(curves, ROOT))  # the script runs in ROOT
        runs.append(Run(name, command, logs / f"{name}.txt", curves))
    reported = tuple(BENCHMARKS) if not quick else tuple(
        n for n in BENCHMARKS if n in names or (logs / f"{n}.txt").exists())
    return Plan(tuple(runs), logs, results, figures, quick, reported)


def run(job: Run, quick: bool) -> float:
    """Run one planned benchmark into its log; the seconds it took."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(job.log, "w") as log:
        shown = ["python", os.path.relpath(job.command[1], ROOT), *job.command[2:]]
        log.write(header(shown, quick))
        log.flush()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        code = subprocess.run(job.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    elapsed = time.perf_counter() - start
    with open(job.log, "a") as log:
        log.write(f"# exit {code} after {elapsed:.0f} s\n")
    return elapsed


# -- reporting --------------------------------------------------------------------------------------


def last_table(text: str) -> list[str]:
    """The last markdown table in ``text`` (its lines), or [] if there is none."""
    tables = all_tables(text)
    return tables[-1] if tables else []


def report_tables(text: str, bench: "Benchmark") -> list[list[str]]:
    """The log's tables from the first whose header names ``bench.cost`` on (every table if none does)."""
    tables = all_tables(text)
    first = next((i for i, t in enumerate(tables) if bench.cost in t[0]), 0)
    return tables[first:]


def all_tables(text: str) -> list[list[str]]:
    """Every markdown table in ``text`` (each as its lines), in order."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


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


def save(figure, filename: str, figures: Optional[Path] = None) -> Path:
    """Lay out ``figure``, write it to ``figures/filename`` (default ``FIGURES``) and free it."""
    figure.tight_layout()
    figures = FIGURES if figures is None else figures
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / filename
    figure.savefig(path, dpi=110)
    pyplot().close(figure)
    return path


def plot(name: str, bench: Benchmark, table: list[str], figures: Optional[Path] = None) -> Optional[Path]:
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
    return save(figure, f"{name}.png", figures)


def plot_curves(name: str, runs: list[dict], figures: Optional[Path] = None) -> Optional[Path]:
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
    return save(figure, f"{name}_curves.png", figures)


def report(where: Optional[Plan] = None) -> str:
    """The markdown report of the logs in ``where.logs`` (default: the committed logs) for ``where.results``,
    drawing its plots into ``where.figures``; links are relative to the report's folder."""
    where = plan() if where is None else where
    home = where.results.parent

    def link(path: Path) -> str:
        return Path(os.path.relpath(path, home)).as_posix()

    logs = Path(os.path.relpath(where.logs, ROOT)).as_posix()
    if where.quick:
        intro = (f"Smoke test written by `python benchmarks/run_all.py --quick` from the logs in `{logs}/`: each "
                 "script ran once with its own `--quick` settings, so the numbers only show that it runs and "
                 "prints its table; they mean nothing. The measured results are in `benchmarks/RESULTS.md`.")
    else:
        intro = (f"Written by `python benchmarks/run_all.py` from the logs in `{logs}/` (rebuild with "
                 "`--report-only`). Every figure was measured on the machine named under each table — this "
                 "project's 2-core CPU machines unless it says otherwise — with every method of a table run in one "
                 "process, side by side, so ratios compare like with like; absolute times do not transfer to other "
                 "hardware. The method cards discuss each table. The GPU check (`benchmarks/gpu_check.py`: every "
                 "callback on CUDA in bf16-mixed and 16-mixed, syncs per step, 8-bit states, the 2:4 export, "
                 "GaLore's peak memory) needs a CUDA machine and is not run from here; no GPU has been lent to this "
                 "project yet, so its table is not in this file.")
    parts = ["# Benchmark results" + (" — quick smoke test" if where.quick else ""), "", intro, ""]
    for name in where.reported:
        bench = BENCHMARKS[name]
        card = f"[{Path(bench.card).name}]({link(ROOT / bench.card)})"
        parts += [f"## {name}: {bench.question}", ""]
        log = where.logs / f"{name}.txt"
        if not log.exists():
            again = f"python benchmarks/run_all.py{' --quick' if where.quick else ''} --only {name}"
            parts += [f"Not run yet: `{again}`. See {card} for earlier measurements.", ""]
            continue
        text = log.read_text()
        fields, table = log_fields(text), last_table(text)
        parts += [f"`{fields.get('command', '?')}` — {fields.get('date', '?')}, {fields.get('machine', '?')}"
                  f"{' — **' + fields['kind'] + '**' if 'QUICK' in fields.get('kind', '') else ''}"
                  f"{' (' + fields['note'] + ')' if 'note' in fields else ''}", ""]
        if not table:
            parts += ["The log holds no table (the run failed or was cut short).", ""]
            continue
        for shown in report_tables(text, bench) if bench.every_table else [table]:
            parts += [*shown, ""]
        figure = plot(name, bench, table, where.figures)
        if figure is not None:
            parts += [f"![{name}]({link(figure)})", ""]
        runs = where.logs / f"{name}.json"
        curves = plot_curves(name, json.loads(runs.read_text()), where.figures) if runs.exists() else None
        if curves is not None:
            parts += [f"![{name}: validation loss against wall time]({link(curves)})", ""]
        parts += [f"Discussed in {card}.", ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test of each script, into a folder of its own")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the logs, figures and report (default: benchmarks/logs/, with --quick "
                             "benchmarks/logs/quick/)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plan", action="store_true", help="print the commands and paths; run and write nothing")
    args = parser.parse_args()
    where = plan(args.only, args.quick, args.out)
    if args.plan:
        for job in where.runs:
            print(f"{job.name}: {shlex.join(job.command)}\n    -> {job.log}")
        print(f"report -> {where.results}, figures -> {where.figures}")
        return
    if not args.report_only:
        for job in where.runs:
            print(f"{job.name}: running", flush=True)
            print(f"{job.name}: {run(job, args.quick):.0f} s", flush=True)
    where.results.parent.mkdir(parents=True, exist_ok=True)
    where.results.write_text(report(where))
    print(f"wrote {os.path.relpath(where.results, ROOT)}")


if __name__ == "__main__":
    main()
