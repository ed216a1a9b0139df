"""FSDP2 on the pydoc Llama: what each rank holds, what it sends, how long a step takes, and whether
GaLore trained sharded ends where one process ends.

    python benchmarks/fsdp2.py                     # 1 process, then FSDP2 on 2 and 4 CPU processes
    python benchmarks/fsdp2.py --quick             # smoke test

The pydoc Llama of ``galore.py`` (rank 64, scale 0.25, the recipe's AdamW and schedule), the same 16
sequences per optimizer step whatever the number of processes (each of W ranks takes 16/W), one
thread per process, gloo. ``CausalLM.configure_model`` shards each decoder block and the root with
``fully_shard`` under ``ModelParallelStrategy(data_parallel_size=W, tensor_parallel_size=1)``.

Part 1 (``--steps`` steps per run; AdamW, GaLore, GaLore 8-bit, GaLore with ``shard_basis`` (sharded
runs only) and RigL at 90%): per-rank bytes of
parameters, gradients (at the optimizer step) and optimizer state (after the last step), on the
rank that holds most; bytes each rank hands to collectives per step (the input of every
all-gather, reduce-scatter, all-reduce, gather and broadcast, counted by wrapping ``torch.distributed``)
and an estimate of what it sends on the wire (ring algorithms: an all-reduce sends 2(W-1)/W of its
input, a reduce-scatter (W-1)/W, an all-gather W-1 times its part),
on an ordinary step and on the step that refreshes GaLore's bases / updates RigL's masks; the
median step time against the FSDP2 AdamW baseline at the same W. More processes than the 2 cores
share the cores: step times at W=4 measure oversubscription, not scaling.

Part 2 (``--val-steps`` steps, validation every 50): GaLore's best validation loss on one process
and FSDP2 on 2 processes, with AdamW's for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.common import pydoc_llama  # noqa: E402
from benchmarks.galore import RANK, SCALE  # noqa: E402
from lit_efficient import GaLore, RigL  # noqa: E402
from lit_efficient.core.distributed import local_bytes  # noqa: E402

GLOBAL_BATCH = 16
GAP = 10  # GaLore's refresh and RigL's mask update fall on step 10 of the short runs
METHODS = {
    "AdamW": lambda gap: [],
    "GaLore": lambda gap: [GaLore(rank=RANK, update_proj_gap=gap, scale=SCALE)],
    "GaLore 8-bit": lambda gap: [GaLore(rank=RANK, update_proj_gap=gap, scale=SCALE, eight_bit=True)],
    "GaLore, Q sharded": lambda gap: [GaLore(rank=RANK, update_proj_gap=gap, scale=SCALE, shard_basis=True)],
    "RigL 90%": lambda gap: [RigL(sparsity=0.9, update_every=f"{gap}st", stop=1.0)],
}
# collective -> (position, name) of the argument whose bytes this rank hands in (FSDP2 passes it by name)
COLLECTIVES = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "gather": (0, "tensor"),
               "all_gather": (1, "tensor"), "all_gather_into_tensor": (1, "input_tensor"),
               "all_gather_single": (1, "input_tensor"),
               "reduce_scatter_tensor": (1, "input"), "reduce_scatter_single": (1, "input")}
# bytes a rank sends on the wire per byte it hands in, for ring algorithms on W ranks
WIRE = {"all_reduce": lambda w: 2 * (w - 1) / w, "broadcast": lambda w: (w - 1) / w, "gather": lambda w: (w - 1) / w,
        "all_gather": lambda w: w - 1, "all_gather_into_tensor": lambda w: w - 1, "all_gather_single": lambda w: w - 1,
        "reduce_scatter_tensor": lambda w: (w - 1) / w, "reduce_scatter_single": lambda w: (w - 1) / w}
SAME_AS_ONE_PROCESS = {"GaLore, Q sharded": "GaLore"}  # shard_basis changes nothing in one process
UPDATE_BATCH = {"GaLore": GAP, "GaLore 8-bit": GAP, "GaLore, Q sharded": GAP,  # the refresh: in global step GAP
                "RigL 90%": GAP - 1}  # the mask update after optimizer step GAP, at the end of batch GAP - 1


class CommunicationCounter:
    """Bytes this process hands to ``torch.distributed`` collectives, by name, while installed."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.wire = 0.0  # estimated bytes sent on the wire (WIRE)
        self._saved: dict[str, object] = {}

    def install(self) -> "CommunicationCounter":
        for name, (position, keyword) in COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(*args, __original=original, __name=name, __position=position, __keyword=keyword, **kwargs):
                tensor = args[__position] if len(args) > __position else kwargs.get(__keyword)
                if isinstance(tensor, torch.Tensor):
                    handed = tensor.numel() * tensor.element_size()
                    self.bytes[__name] += handed
                    self.wire += WIRE[__name](dist.get_world_size(kwargs.get("group"))) * handed
                return __original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def total(self) -> tuple[int, float]:
        """(bytes handed in, estimated bytes on the wire) so far."""
        return sum(self.bytes.values()), self.wire


class Record(pl.Callback):
    """Per step: bytes sent and wall time; at the optimizer step: gradient bytes; at the end: state bytes."""

    def __init__(self, counter: CommunicationCounter) -> None:
        self.counter = counter
        self.sent: list[int] = []
        self.wire: list[float] = []
        self.times: list[float] = []
        self.grad_bytes = 0
        self._start = ((0, 0.0), 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = (self.counter.total(), time.perf_counter())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad_bytes = max(self.grad_bytes, sum(local_bytes(p.grad) for p in pl_module.parameters()
                                                   if p.grad is not None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start[1])
        (handed, wire), (handed_before, wire_before) = self.counter.total(), self._start[0]
        self.sent.append(handed - handed_before)
        self.wire.append(wire - wire_before)


def state_bytes(optimizer) -> int:
    return sum(local_bytes(v) for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def worker(method: str, ranks: int, steps: int, val_steps: int, out: str) -> None:
    """One fit; every rank writes its measurements to ``out.<rank>``."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    counter = CommunicationCounter().install()
    record = Record(counter)
    model, data = pydoc_llama(0)
    data.setup("fit")
    validating = val_steps > 0
    kwargs = {}
    if ranks > 1:
        from lightning.pytorch.strategies import ModelParallelStrategy

        kwargs = dict(devices=ranks, strategy=ModelParallelStrategy(data_parallel_size=ranks, tensor_parallel_size=1),
                      use_distributed_sampler=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=val_steps if validating else steps, logger=False,
                         limit_val_batches=1.0 if validating else 0, val_check_interval=50 if validating else None,
                         check_val_every_n_epoch=None, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*METHODS[method](200 if validating else GAP), record],
                         default_root_dir=os.path.dirname(out), **kwargs)
    rank = trainer.global_rank
    if ranks > 1:
        sampler = DistributedSampler(data.train_set, num_replicas=ranks, rank=rank, shuffle=False)
        train = DataLoader(data.train_set, batch_size=GLOBAL_BATCH // ranks, sampler=sampler, drop_last=True)
        val_sampler = DistributedSampler(data.val_set, num_replicas=ranks, rank=rank, shuffle=False)
        val = DataLoader(data.val_set, batch_size=GLOBAL_BATCH // ranks, sampler=val_sampler)
    else:
        train = DataLoader(data.train_set, batch_size=GLOBAL_BATCH, shuffle=False, drop_last=True)
        val = DataLoader(data.val_set, batch_size=GLOBAL_BATCH)
    val_losses = []

    class Validation(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            if "val/loss" in trainer.callback_metrics:
                val_losses.append(float(trainer.callback_metrics["val/loss"]))

    trainer.callbacks.append(Validation())
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val if validating else None)
    result = dict(params=sum(local_bytes(p) for p in model.parameters()), grads=record.grad_bytes,
                  state=state_bytes(trainer.optimizers[0]), sent=record.sent, wire=record.wire, times=record.times,
                  by_collective=dict(counter.bytes), val=val_losses)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, ranks: int, steps: int, val_steps: int, root: str) -> list[dict]:
    """Every rank's measurements of one run."""
    out = os.path.join(root, "run.json")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=os.path.dirname(HERE),
               HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--ranks", str(ranks),
               "--steps", str(steps), "--val-steps", str(val_steps), "--out", out]
    subprocess.run(command, check=True, env=env, cwd=root)
    results = []
    for rank in range(ranks):
        with open(f"{out}.{rank}") as f:
            results.append(json.load(f))
        os.remove(f"{out}.{rank}")
    return results


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--val-steps", type=int, default=300)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.ranks[0], args.steps, args.val_steps, args.out)
        return
    if args.quick:
        args.steps, args.val_steps, args.ranks = GAP + 2, 0, [1, 2]
    pydoc_llama(0)[1].prepare_data()  # the tokenizer is trained and cached once, before any rank loads it
    table = {}
    with tempfile.TemporaryDirectory() as root:
        for ranks in args.ranks:
            for method in args.methods:
                if ranks == 1 and method in SAME_AS_ONE_PROCESS:
                    continue
                runs = launch(method, ranks, args.steps, 0, root)
                most = {key: max(run[key] for run in runs) for key in ("params", "grads", "state")}
                sent, at = runs[0]["sent"], UPDATE_BATCH.get(method, GAP)
                ordinary = statistics.median(n for i, n in enumerate(sent) if i >= 2 and i != at)
                update = sent[at] if len(sent) > at else float("nan")
                wire = statistics.median(n for i, n in enumerate(runs[0]["wire"]) if i >= 2 and i != at)
                time_ms = 1000 * statistics.median(t for i, t in enumerate(runs[0]["times"]) if i >= 2 and i != at)
                table[(method, ranks)] = dict(most, ordinary=ordinary, wire=wire, update=update, time=time_ms)
                print(f"{method} on {ranks}: {table[(method, ranks)]}", flush=True)
        losses = {}
        for method, ranks in [("GaLore", 1), ("GaLore", 2), ("AdamW", 1), ("AdamW", 2)] if args.val_steps else []:
            if method in args.methods:
                losses[(method, ranks)] = min(launch(method, ranks, 0, args.val_steps, root)[0]["val"])
                print(f"{method} on {ranks}: best val {losses[(method, ranks)]:.4f}", flush=True)

    print(f"\npydoc Llama, {GLOBAL_BATCH} sequences per step on every W, rank {RANK}, scale {SCALE}, "
          f"{args.steps} steps (GaLore's refresh and RigL's update at step {GAP}); W=1 is one process, "
          "unsharded; MiB per rank (the rank holding most)")
    print("| method | W | parameters MiB | gradients MiB | optimizer state MiB | state × W / one process's "
          "| sent per step MiB | sent on the update step MiB | extra sent vs AdamW | extra on the wire vs AdamW "
          "| step ms | step vs AdamW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (method, ranks), row in table.items():
        one = table.get((SAME_AS_ONE_PROCESS.get(method, method), 1))
        adamw = table.get(("AdamW", ranks))
        share = f"{row['state'] * ranks / one['state']:.3f}" if one and one["state"] else "–"
        extra = f"{(row['ordinary'] - adamw['ordinary']) / adamw['ordinary']:+.2%}" \
            if adamw and adamw["ordinary"] and method != "AdamW" else "–"
        wire = f"{(row['wire'] - adamw['wire']) / adamw['wire']:+.2%}" \
            if adamw and adamw["wire"] and method != "AdamW" else "–"
        speed = f"{row['time'] / adamw['time']:.2f}x" if adamw else "–"
        print(f"| {method} | {ranks} | {mib(row['params'])} | {mib(row['grads'])} | {mib(row['state'])} | {share} | "
              f"{mib(row['ordinary'])} | {mib(row['update'])} | {extra} | {wire} | {row['time']:.0f} | {speed} |")
    if losses:
        print(f"\nBest validation loss over {args.val_steps} steps (validation every 50), update_proj_gap 200")
        print("| method | one process | FSDP2, 2 processes | difference |")
        print("|---|---|---|---|")
        for method in ("AdamW", "GaLore"):
            if (method, 1) in losses:
                one, two = losses[(method, 1)], losses[(method, 2)]
                print(f"| {method} | {one:.4f} | {two:.4f} | {two - one:+.4f} |")


if __name__ == "__main__":
    main()
