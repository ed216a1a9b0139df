"""Data parallelism over gloo: what ``ExactCompressionDDPStrategy`` sends, against plain DDP and
torch's PowerSGD hook, how long a step takes, and where each run ends.

    python benchmarks/communication.py             # both tasks, 2 and 4 CPU processes
    python benchmarks/communication.py --quick     # smoke test

Tasks: the pydoc Llama of ``galore.py`` trained with GaLore (rank 64 = d/4, scale 0.25,
``update_proj_gap`` 200), 16 sequences per optimizer step whatever the number of processes; the
standard 32×32 digits ViT (patch 4, width 96, 6 blocks) trained with RigL at 90% sparsity (masks
updated every 20 steps), 64 images per step. Each technique runs under four ways of averaging
gradients: plain DDP, ``ddp_exact_compression`` (ours: GaLore's projections between refreshes,
RigL's kept entries between updates, everything else whole), and torch's PowerSGD hook
(``powerSGD_hook``, error feedback, warm start, compression from step 2) at rank 4 and at the rank
whose bytes per step come closest to ours. Lightning registers communication hooks on CUDA only, so
the PowerSGD runs register theirs themselves. One thread per process, gloo on one machine: more
processes than the 2 cores share them, so step times at W=4 measure oversubscription, not a slow link.
All four use one gradient bucket per step (``bucket_cap_mb=100``): PowerSGD's chained all-reduces
can interleave across buckets under gloo and mismatch between ranks.

Part 1 (``--steps`` steps at W = 2 and 4): bytes each rank hands to the gradient all-reduce per step
(plain DDP: every gradient, the sum of its parameters' sizes; ours and PowerSGD's: counted as they
call ``torch.distributed.all_reduce``), on an ordinary step and on RigL's update step; for ours, the
bytes of the technique's target matrices against plain DDP's; the median step time against plain DDP.
Part 2 (``--lm-steps`` steps of the Llama, ``--vit-epochs`` epochs of the ViT, W=2): validation loss
(and the ViT's accuracy) at the end, for all four.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.common import pydoc_llama  # noqa: E402
from benchmarks.fsdp2 import free_port  # noqa: E402
from benchmarks.galore import RANK, SCALE  # noqa: E402
from lit_efficient import ExactCompressionDDPStrategy, GaLore, RigL  # noqa: E402

GAP = 200  # GaLore's refresh: at step 0 only in these runs (the r = d/4 setting)
RIGL_EVERY = 20
TECHNIQUE = {"lm": "galore", "vit": "rigl"}
WAYS = ("DDP", "exact", "PowerSGD 4", "PowerSGD matched")
BUCKET_MB = 100


class PowerSGDStrategy(DDPStrategy):
    """Plain DDP with torch's PowerSGD hook registered on any device."""

    def __init__(self, rank: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.approximation_rank = rank

    def configure_ddp(self) -> None:
        super().configure_ddp()
        state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=self.approximation_rank,
                                       start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        self.model.register_comm_hook(state, powersgd.powerSGD_hook)


class AllReduceBytes:
    """Bytes this process hands to ``torch.distributed.all_reduce`` while installed (the hooks')."""

    def __init__(self) -> None:
        self.total = 0
        original = dist.all_reduce

        def counted(tensor, *args, **kwargs):
            self.total += tensor.numel() * tensor.element_size()
            return original(tensor, *args, **kwargs)

        dist.all_reduce = counted


class Record(pl.Callback):
    """Per optimizer step: wall time, bytes handed to the hook's all-reduces, and (ours) per technique."""

    def __init__(self, counter: AllReduceBytes) -> None:
        self.counter = counter
        self.times, self.sent, self.technique = [], [], []
        self._start = (0.0, 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = (time.perf_counter(), self.counter.total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start[0])
        self.sent.append(self.counter.total - self._start[1])
        traffic = getattr(trainer.strategy, "traffic", None)
        if traffic is not None:
            self.technique.append([traffic.last_sent, traffic.last_whole])


def strategy_for(way: str, rank: int):
    # one bucket per step for all four: PowerSGD chains its all-reduces in futures, which under gloo
    # can interleave across buckets differently on each rank (seen: "Received data size doesn't match")
    if way == "DDP":
        return DDPStrategy(bucket_cap_mb=BUCKET_MB)
    if way == "exact":
        return ExactCompressionDDPStrategy(bucket_cap_mb=BUCKET_MB)
    return PowerSGDStrategy(rank, bucket_cap_mb=BUCKET_MB)


def worker(task: str, way: str, rank: int, ranks: int, steps: int, epochs: int, out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    counter = AllReduceBytes()
    record = Record(counter)
    if task == "lm":
        model, data = pydoc_llama(0)
        data.batch_size = 16 // ranks
        callbacks = [GaLore(rank=RANK, update_proj_gap=GAP, scale=SCALE)]
        limits = dict(max_steps=steps, limit_val_batches=1.0 if epochs else 0, val_check_interval=steps,
                      check_val_every_n_epoch=None)
    else:
        from examples.vision.data import DigitsDataModule
        from examples.vision.vit import ViTClassifier

        model = ViTClassifier(in_chans=1, num_classes=10, mlp_ratio=2.0, weight_decay=0.05, img_size=32, patch_size=4,
                              embed_dim=96, depth=6, num_heads=3, lr=2e-3)
        data = DigitsDataModule(batch_size=64 // ranks, seed=0, image_size=32)
        callbacks = [RigL(sparsity=0.9, update_every=f"{RIGL_EVERY}st")]
        limits = dict(max_epochs=epochs) if epochs else dict(max_steps=steps, limit_val_batches=0)
    trainer = pl.Trainer(accelerator="cpu", devices=ranks, strategy=strategy_for(way, rank), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[*callbacks, record], default_root_dir=os.path.dirname(out),
                         **limits)
    trainer.fit(model, datamodule=data)
    if trainer.is_global_zero:
        matrices = [tuple(p.shape) for p in model.parameters() if p.dim() == 2]
        targets = ([tuple(p.shape) for p, _ in trainer.optimizers[0].projected_params()] if task == "lm"
                   else callbacks[0].masks.shapes)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        result = dict(times=record.times, sent=record.sent, technique=record.technique, metrics=metrics,
                      whole=4 * sum(p.numel() for p in model.parameters() if p.requires_grad), matrices=matrices,
                      vectors=sum(p.numel() for p in model.parameters() if p.dim() != 2), targets=targets,
                      density=callbacks[0].masks.density() if task == "vit" else None)
        with open(out, "w") as f:
            json.dump(result, f)


def launch(task: str, way: str, rank: int, ranks: int, steps: int, epochs: int, root: str) -> dict:
    out = os.path.join(root, "run.json")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=os.path.dirname(HERE),
               HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.abspath(__file__), "--worker", task, way, str(rank), "--ranks", str(ranks),
               "--steps", str(steps), "--epochs", str(epochs), "--out", out]
    subprocess.run(command, check=True, env=env, cwd=root)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def powersgd_bytes(rank: int, run: dict) -> int:
    """What torch's PowerSGD hook hands to its all-reduces per step at ``rank``: ``k·(m+n)`` per matrix
    it compresses (those where that is at most half of ``m·n``, its ``min_compression_rate`` 2), every
    other tensor whole."""
    matrices = sum(rank * (m + n) if m * n >= 2 * rank * (m + n) else m * n for m, n in run["matrices"])
    return 4 * (matrices + run["vectors"])


def matched_rank(sent: float, run: dict) -> int:
    """PowerSGD's rank whose bytes per step come closest to ``sent``."""
    return min(range(1, 513), key=lambda k: abs(powersgd_bytes(k, run) - sent))


def ordinary_steps(values: list, task: str, skip: int = 3) -> list:
    """The steps after the first ``skip`` (PowerSGD's uncompressed start), without RigL's update step."""
    update = {RIGL_EVERY - 1} if task == "vit" else set()
    return [v for i, v in enumerate(values) if i >= skip and i not in update]


def ordinary(values: list, task: str) -> float:
    return statistics.median(ordinary_steps(values, task))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lm-steps", type=int, default=150)
    parser.add_argument("--vit-epochs", type=int, default=8)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tasks", nargs="+", default=["lm", "vit"], choices=["lm", "vit"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task, way, rank = args.worker
        worker(task, way, int(rank), args.ranks[0], args.steps, args.epochs, args.out)
        return
    if args.quick:
        args.steps, args.lm_steps, args.vit_epochs, args.ranks = RIGL_EVERY + 2, 4, 1, [2]
    if "lm" in args.tasks:
        pydoc_llama(0)[1].prepare_data()  # the tokenizer is trained and cached once, before any rank loads it
    speed, quality, ranks_used = {}, {}, {}
    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks:
            for ranks in args.ranks:
                for way in WAYS:
                    rank = 4
                    if way == "PowerSGD matched":
                        exact = speed[(task, ranks, "exact")]
                        rank = matched_rank(exact["ordinary"], exact["run"])
                    run = launch(task, way, rank, ranks, args.steps, 0, root)
                    row = dict(run=run, rank=rank, ordinary=ordinary(run["sent"], task),
                               time=ordinary(run["times"], task))
                    if way == "DDP":
                        row["ordinary"] = run["whole"]  # DDP's own reducer: every gradient, outside Python
                    if task == "vit":
                        update = run["sent"][RIGL_EVERY - 1] if way != "DDP" else run["whole"]
                        row["update"] = update
                    if way == "exact":
                        technique = TECHNIQUE[task]
                        steps = ordinary_steps(run["technique"], task)
                        row["target_ratio"] = statistics.median(s[0][technique] / s[1][technique] for s in steps)
                    speed[(task, ranks, way)] = row
                    ranks_used.setdefault((task, way), rank)  # part 2 runs at the first W's
                    print(f"{task} {way} (rank {rank}) on {ranks}: sent {row['ordinary']} B/step, "
                          f"{1000 * row['time']:.0f} ms/step", flush=True)
            for way in WAYS:
                steps, epochs = (args.lm_steps, 1) if task == "lm" else (0, args.vit_epochs)
                run = launch(task, way, ranks_used[(task, way)], 2, steps, epochs, root)
                quality[(task, way)] = run["metrics"]
                print(f"{task} {way}: {run['metrics']}", flush=True)

    for task in args.tasks:
        name = ("pydoc Llama, GaLore rank 64 (d/4), gap 200, 16 sequences per step" if task == "lm"
                else "32×32 digits ViT, RigL 90%, masks updated every 20 steps, 64 images per step")
        print(f"\n{name}; {args.steps} steps; bytes each rank hands to the gradient all-reduce per step; medians "
              "over steps 4 on (without RigL's update step)")
        extra = " | sent on the update step KiB |" if task == "vit" else " |"
        print("| way | W | PowerSGD rank | sent per step KiB | sent vs plain DDP | target matrices vs plain DDP"
              f"{extra} step ms | step vs plain DDP |")
        print("|---|---|---|---|---|---|" + ("---|" if task == "vit" else "") + "---|---|")
        for ranks in args.ranks:
            plain = speed[(task, ranks, "DDP")]
            for way in WAYS:
                row = speed[(task, ranks, way)]
                rank = str(row["rank"]) if way.startswith("PowerSGD") else "–"
                target = f"{row['target_ratio']:.3f}" if "target_ratio" in row else "–"
                update = f" {row['update'] / 1024:.1f} |" if task == "vit" else ""
                print(f"| {way} | {ranks} | {rank} | {row['ordinary'] / 1024:.1f} | "
                      f"{row['ordinary'] / plain['ordinary']:.3f} | {target} |{update} {1000 * row['time']:.0f} | "
                      f"{row['time'] / plain['time']:.2f}x |")
        steps = f"{args.lm_steps} steps" if task == "lm" else f"{args.vit_epochs} epochs"
        print(f"\nAt the end of {steps} on 2 processes")
        print("| way | PowerSGD rank | val loss |" + (" val acc |" if task == "vit" else ""))
        print("|---|---|---|" + ("---|" if task == "vit" else ""))
        for way in WAYS:
            metrics = quality[(task, way)]
            rank = str(ranks_used[(task, way)]) if way.startswith("PowerSGD") else "–"
            acc = f" {100 * metrics.get('val/acc', float('nan')):.1f}% |" if task == "vit" else ""
            print(f"| {way} | {rank} | {metrics.get('val/loss', float('nan')):.4f} |{acc}")

    print(f"\nSummary at W={args.ranks[0]}: bytes and step time of an ordinary step, validation at the end of part 2")
    print("| task, way | sent vs plain DDP | step vs plain DDP | val loss | val acc |")
    print("|---|---|---|---|---|")
    for task in args.tasks:
        plain = speed[(task, args.ranks[0], "DDP")]
        for way in WAYS:
            row, metrics = speed[(task, args.ranks[0], way)], quality[(task, way)]
            acc = f"{100 * metrics['val/acc']:.1f}%" if "val/acc" in metrics else "–"
            print(f"| {'Llama' if task == 'lm' else 'ViT'}, {way} | {row['ordinary'] / plain['ordinary']:.3f} | "
                  f"{row['time'] / plain['time']:.2f}x | {metrics.get('val/loss', float('nan')):.4f} | {acc} |")


if __name__ == "__main__":
    main()
