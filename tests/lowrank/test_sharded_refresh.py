"""A GaLore refresh of a matrix whose rows are split over 3 gloo ranks (8, 8 and 7 of 23):
``sharded_svd_bases`` gives every rank the basis one process computes from the whole gradient (its
rows of P, all of Q) for every side and decomposition, and no rank receives the whole gradient
except the one rank that decomposes it for all, where an exact decomposition needs every row."""

import math

import torch
import torch.distributed as dist

from lit_efficient.core.shards import Span
from lit_efficient.lowrank.projector import sharded_svd_bases, svd_bases
from tests.ddp_runner import failures_on_gloo_ranks

RANK = 4
BOUNDS = {23: [0, 8, 16, 23], 40: [0, 14, 28, 40]}  # torch.chunk's split over 3 ranks
# (shape, side, method, whether one rank gathers the whole gradient)
CASES = [((40, 23), "right", "svd", False),  # the Gram matrix GᵀG, all-reduced
         ((40, 23), "right", "randomized_svd", False),
         ((23, 40), "left", "randomized_svd", False),  # the sketch, made row by row
         ((23, 40), "left", "svd", True),  # G Gᵀ needs every pair of rows: one rank decomposes
         ((23, 40), "right", "svd", True),  # a wide matrix's right side
         ((23, 40), "full", "svd", True)]


def gradient(shape, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    u, v = torch.linalg.qr(torch.randn(m, 6, generator=g))[0], torch.linalg.qr(torch.randn(n, 6, generator=g))[0]
    return u @ torch.diag(torch.linspace(10, 2, 6)) @ v.T + 0.05 * torch.randn(m, n, generator=g)


def same_up_to_signs(got, expected, columns):
    """Bases equal once each vector (a column of P, a row of Q) takes the expected one's sign."""
    dots = (got * expected).sum(dim=0 if columns else 1)
    signs = torch.where(dots < 0, -1.0, 1.0)
    aligned = got * (signs.unsqueeze(0) if columns else signs.unsqueeze(1))
    return torch.allclose(aligned, expected, atol=1e-4)


class Received:
    """Elements each collective hands to this rank, by name, while installed."""

    def __init__(self):
        self.sizes, self._saved = [], {}

    def __enter__(self):
        for name in ("all_gather", "gather", "all_reduce", "broadcast"):
            original = self._saved[name] = getattr(dist, name)

            def counted(*args, __original=original, __name=name, **kwargs):
                if __name == "all_gather":
                    self.sizes.append((__name, sum(t.numel() for t in args[0])))
                elif __name == "gather":
                    received = args[1] if len(args) > 1 else kwargs.get("gather_list")
                    self.sizes.append((__name, sum(t.numel() for t in received) if received else 0))
                else:
                    self.sizes.append((__name, args[0].numel()))
                return __original(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _ranks(rank, world, failures):
    for case, (shape, side, method, gathered) in enumerate(CASES):
        whole = gradient(shape, seed=case)
        bounds = BOUNDS[shape[0]]
        rows = slice(bounds[rank], bounds[rank + 1])
        span = Span(shape, bounds[rank], bounds[rank + 1] - bounds[rank], bounds[1], dist.group.WORLD)
        root = case % world
        with Received() as received:
            p, q = sharded_svd_bases(whole[rows], RANK, side, method, span, seed=7, root=root)
        want_p, want_q = svd_bases(whole, RANK, side, method, seed=7)
        if (p is None) != (want_p is None) or (q is None) != (want_q is None):
            failures.append((case, rank, "sides"))
            continue
        if p is not None and not same_up_to_signs(p, want_p[rows], columns=True):
            failures.append((case, rank, "P"))
        if q is not None and not same_up_to_signs(q, want_q, columns=False):
            failures.append((case, rank, "Q"))
        largest = max((size for name, size in received.sizes if name != "gather"), default=0)
        whole_here = sum(size for name, size in received.sizes if name == "gather")
        padded = bounds[1] * world * shape[1]
        if largest >= math.prod(shape) or whole_here != (padded if gathered and rank == root else 0):
            failures.append((case, rank, "received", received.sizes))


def test_every_rank_ends_with_one_process_basis_without_receiving_the_whole_gradient():
    failures = failures_on_gloo_ranks(_ranks, 3)
    assert not failures, failures[:4]
