"""How far GaLore under 2-rank DDP ends from one process on the same global batches, per
``moments_on_refresh``: the distance the refresh's arbitrary signs used to add.

    python benchmarks/galore_ddp.py                   # pydoc Llama, 60 steps, refreshes every 15
    python benchmarks/galore_ddp.py --quick           # smoke test

The pydoc Llama of ``galore.py`` (rank 64, scale 0.25, the recipe's AdamW and schedule), trained
``--steps`` steps with ``update_proj_gap=--gap`` (bases from steps 0, 15, 30 and 45: three refreshes
that carry moments), once on 2 CPU processes (DDP, gloo, 8 sequences each) and once in one process
(16 sequences), on the same unshuffled global batches, one thread per process. The all-reduced
gradient differs from the one-process gradient by float rounding only, so a method that depends on
the subspace alone should end where one process ends; AdamW (no projection) shows that floor.
Reported: the largest weight difference over the whole model, and the relative Frobenius distance
over the 28 projected matrices.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.common import pydoc_llama  # noqa: E402
from benchmarks.galore import RANK, SCALE, ReferenceGaLoreLM  # noqa: E402
from lit_efficient import GaLore  # noqa: E402
from lit_efficient.core.targets import select_targets  # noqa: E402

GLOBAL_BATCH = 16
METHODS = {"AdamW": None, "GaLore svd keep": "keep", "GaLore svd align": "align", "GaLore svd rotate": "rotate",
           "galore_torch": "reference"}


def worker(method: str, devices: int, steps: int, gap: int, out: str) -> None:
    """One fit of ``method`` on ``devices`` processes; rank 0 saves the final weights to ``out``."""
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    how = METHODS[method]
    model, data = pydoc_llama(0, ReferenceGaLoreLM if how == "reference" else None)
    model.update_proj_gap = gap  # read by the reference optimizer only
    data.setup("fit")
    callbacks = [GaLore(rank=RANK, update_proj_gap=gap, scale=SCALE, moments_on_refresh=how)] \
        if how in ("keep", "align", "rotate") else []
    kwargs = dict(strategy="ddp", use_distributed_sampler=False) if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_steps=steps, logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks, default_root_dir=os.path.dirname(out),
                         **kwargs)
    if devices > 1:
        sampler = DistributedSampler(data.train_set, num_replicas=devices, rank=trainer.global_rank, shuffle=False)
        train = DataLoader(data.train_set, batch_size=GLOBAL_BATCH // devices, sampler=sampler, drop_last=True)
    else:
        train = DataLoader(data.train_set, batch_size=GLOBAL_BATCH, shuffle=False, drop_last=True)
    trainer.fit(model, train_dataloaders=train)
    if trainer.global_rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(method: str, devices: int, steps: int, gap: int, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONPATH=os.path.dirname(HERE),
               HF_HUB_OFFLINE="1")
    command = [sys.executable, os.path.abspath(__file__), "--worker", method, "--devices", str(devices),
               "--steps", str(steps), "--gap", str(gap), "--out", out]
    subprocess.run(command, check=True, env=env, cwd=os.path.dirname(out))
    return torch.load(out, weights_only=True)


def projected_names() -> set[str]:
    model, _ = pydoc_llama(0)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(t.param)] for t in select_targets(model, ["all-linear"], kinds=("linear",))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--gap", type=int, default=15)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.devices, args.steps, args.gap, args.out)
        return
    if args.quick:
        args.steps, args.gap = 4, 2
    if "galore_torch" in args.methods:
        try:
            import galore_torch  # noqa: F401
        except ImportError:
            print("galore_torch is not installed (pip install galore-torch): leaving it out")
            args.methods.remove("galore_torch")
    pydoc_llama(0)[1].prepare_data()  # the tokenizer is trained and cached once, before any rank loads it
    matrices = projected_names()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for method in args.methods:
            ranks = launch(method, 2, args.steps, args.gap, os.path.join(root, "ranks.pt"))
            alone = launch(method, 1, args.steps, args.gap, os.path.join(root, "alone.pt"))
            largest = max((ranks[k] - alone[k]).abs().max().item() for k in alone if alone[k].is_floating_point())
            gap = sum(((ranks[k] - alone[k]) ** 2).sum().item() for k in matrices) ** 0.5
            norm = sum((alone[k] ** 2).sum().item() for k in matrices) ** 0.5
            rows.append((method, largest, gap / norm))
            print(f"{method}: largest weight difference {largest:.2e}, relative {gap / norm:.2e}", flush=True)
    refreshes = len(range(args.gap, args.steps, args.gap))
    print(f"\npydoc Llama, {args.steps} steps, update_proj_gap {args.gap} ({refreshes} refreshes after the first "
          f"basis), rank {RANK}, scale {SCALE}: 2-rank DDP vs one process on the same global batches")
    print("| method | largest weight difference | relative distance of the projected matrices |")
    print("|---|---|---|")
    for method, largest, relative in rows:
        print(f"| {method} | {largest:.2e} | {relative:.2e} |")


if __name__ == "__main__":
    main()
