"""GaLore's basis refresh on its own: the time to decompose the 28 matrices of the pydoc Llama, and
how close each way of doing it comes to the exact top-r singular subspace.

    python benchmarks/galore_refresh.py --threads 1     # the issue's setting (one thread)
    python benchmarks/galore_refresh.py --threads 2
    python benchmarks/galore_refresh.py --quick         # smoke test

The gradients are real: the standard pydoc Llama (d 256, MLP 688, 4 layers) trained ``--warmup``
steps with AdamW, then one more batch's gradient of every attention/MLP matrix (16 of 256×256, 8 of
688×256, 4 of 256×688), rank 64, ``std`` sides (a right basis for the tall and square matrices, a
left one for the wide ones). Each way is timed over all 28 matrices (median of ``--repeats``), and
compared with the exact basis from a float64 SVD by subspace overlap (mean squared cosine of the
principal angles: 1 is the same subspace), mean and worst over the matrices, and by the gradient
energy the basis keeps (‖G·Bᵀ‖² over the exact basis's), worst over the matrices.

Ways: the Gram-matrix ``eigh`` that ``projection="svd"`` uses, one matrix at a time and with
same-shape Gram matrices stacked into one batched call, and in float64; the full SVD galore-torch uses; the
``torch.svd_lowrank`` call (niter 2, oversampling 4) and the sketched range finder
(:func:`~lit_efficient.lowrank.projector.sketched_row_basis`, oversampling 8) with 0, 1 and 2
power iterations.
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

from benchmarks.common import add_common_arguments, pydoc_llama  # noqa: E402
from lit_efficient.core.targets import select_targets  # noqa: E402
from lit_efficient.lowrank.projector import projection_side, sketched_row_basis, subspace_overlap, svd_bases  # noqa: E402

RANK = 64


def llama_gradients(warmup: int, seed: int, root: str) -> list[torch.Tensor]:
    """The 28 matrices' gradients of one batch after ``warmup`` AdamW steps."""
    pl.seed_everything(seed, verbose=False)
    model, data = pydoc_llama(seed)
    if warmup:
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             max_steps=warmup, limit_val_batches=0, default_root_dir=root)
        trainer.fit(model, datamodule=data)
    else:
        data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    model.zero_grad()
    losses, _ = model._losses(batch)
    losses.mean().backward()
    return [t.param.grad.detach().clone() for t in select_targets(model, ["all-linear"], kinds=("linear",))]


def row_basis(g: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The side ``std`` projects as a row problem: (G or Gᵀ, whether it was transposed)."""
    side = projection_side(tuple(g.shape), "std")
    return (g, False) if side == "right" else (g.T, True)


def exact(g: torch.Tensor) -> torch.Tensor:
    """The exact top-r right singular vectors (r×n) of the row problem, in float64."""
    return torch.linalg.svd(g.double(), full_matrices=False)[2][:RANK].float()


def eigh_each(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [svd_bases(g, RANK, "right", "svd")[1] for g in rows]


def eigh_float64(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The Gram matrix and its eigenvectors in float64: fp32 squares the spectrum's range away."""
    out = []
    for g in rows:
        g64 = g.double()
        _, vectors = torch.linalg.eigh(g64.T @ g64)
        out.append(vectors[:, -RANK:].flip(1).T.float().contiguous())
    return out


def eigh_batched(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Same-shape Gram matrices stacked into one ``eigh`` call per shape."""
    out: list = [None] * len(rows)
    by_shape: dict[tuple, list[int]] = {}
    for i, g in enumerate(rows):
        by_shape.setdefault(tuple(g.shape), []).append(i)
    for indices in by_shape.values():
        stack = torch.stack([rows[i] for i in indices]).float()
        _, vectors = torch.linalg.eigh(stack.transpose(1, 2) @ stack)
        bases = vectors[..., -RANK:].flip(-1).transpose(1, 2)
        for j, i in enumerate(indices):
            out[i] = bases[j].contiguous()
    return out


def full_svd(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.linalg.svd(g.float(), full_matrices=False)[2][:RANK] for g in rows]


def svd_lowrank(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    return [svd_bases(g, RANK, "right", "randomized_svd", seed=i)[1] for i, g in enumerate(rows)]


def sketched(power_iterations: int):
    def ways(rows: list[torch.Tensor]) -> list[torch.Tensor]:
        return [sketched_row_basis(g, RANK, seed=i, power_iterations=power_iterations) for i, g in enumerate(rows)]
    return ways


WAYS = {
    "Gram eigh, one matrix at a time (svd)": eigh_each,
    "Gram eigh, same shapes batched": eigh_batched,
    "Gram eigh in float64": eigh_float64,
    "full SVD (galore-torch)": full_svd,
    "torch.svd_lowrank, niter 2 (randomized_svd before)": svd_lowrank,
    "sketched range finder, 0 power iterations": sketched(0),
    "sketched range finder, 1 power iteration": sketched(1),
    "sketched range finder, 2 power iterations": sketched(2),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=50, help="AdamW steps before the gradients are taken")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 0, 1
    torch.set_num_threads(args.threads)
    grads = llama_gradients(args.warmup, args.seed, args.root)
    rows = [row_basis(g)[0] for g in grads]
    truth = [exact(g) for g in rows]
    results = []
    for name, way in WAYS.items():
        way(rows)  # warm-up: first-call allocations are not a refresh's cost
        times, bases = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            bases = way(rows)
            times.append(time.perf_counter() - start)
        overlaps = [subspace_overlap(t, b, rows=True) for t, b in zip(truth, bases)]
        # the gradient energy the basis keeps, relative to the exact basis's (1: as much)
        energy = [float((g @ b.T).norm() ** 2 / (g @ t.T).norm() ** 2) for g, t, b in zip(rows, truth, bases)]
        results.append((name, statistics.median(times), statistics.mean(overlaps), min(overlaps), min(energy)))
    base = results[0][1]
    shapes = sorted({tuple(g.shape) for g in grads})
    print(f"\nGaLore refresh of the pydoc Llama's {len(grads)} matrices {shapes}, rank {RANK}, after "
          f"{args.warmup} AdamW steps, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| way | refresh of all matrices (ms) | time vs Gram eigh | subspace overlap with exact: mean | worst "
          "| gradient energy kept vs exact: worst |")
    print("|---|---|---|---|---|---|")
    for name, seconds, mean, worst, energy in results:
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / base:.2f} | {mean:.4f} | {worst:.4f} | {energy:.5f} |")


if __name__ == "__main__":
    main()
