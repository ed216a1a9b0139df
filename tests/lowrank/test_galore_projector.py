"""The sketched range finder behind ``projection="randomized_svd"``: close to the exact subspace,
reproducible from its seed, and computable from row shards of the gradient with one sum per
product (what a sharded weight's refresh needs)."""

import threading

import pytest
import torch

from lit_efficient.lowrank.projector import sketched_row_basis, subspace_overlap, svd_bases


def low_rank_plus_noise(m, n, rank, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    return u @ torch.diag(torch.linspace(10, 2, rank)) @ v.T + noise * torch.randn(m, n, generator=g)


def exact_rows(g, rank):
    return torch.linalg.svd(g.double(), full_matrices=False)[2][:rank].float()


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_sketch_finds_the_top_subspace_in_descending_order(shape):
    g = low_rank_plus_noise(*shape, rank=8)
    q = sketched_row_basis(g, 8, seed=3)
    assert q.shape == (8, shape[1])
    torch.testing.assert_close(q @ q.T, torch.eye(8), atol=1e-5, rtol=0)
    assert subspace_overlap(exact_rows(g, 8), q, rows=True) > 0.999
    energy = (g @ q.T).norm(dim=0)  # the singular values, largest first
    assert bool((energy[:-1] >= energy[1:] - 1e-4).all()), energy


def test_power_iterations_bring_a_slowly_decaying_spectrum_closer():
    g = torch.randn(200, 120, generator=torch.Generator().manual_seed(0))  # no gap at all: the hard case
    truth = exact_rows(g, 16)
    overlaps = [subspace_overlap(truth, sketched_row_basis(g, 16, seed=1, power_iterations=k), rows=True)
                for k in (0, 1, 2)]
    assert overlaps[0] < overlaps[1] < overlaps[2], overlaps


def test_same_seed_same_basis_other_seed_other_sketch():
    g = torch.randn(80, 50, generator=torch.Generator().manual_seed(1))
    a, b = sketched_row_basis(g, 6, seed=7), sketched_row_basis(g, 6, seed=7)
    assert torch.equal(a, b)
    assert not torch.allclose(sketched_row_basis(g, 6, seed=8).abs(), a.abs(), atol=1e-3)


def test_row_shards_with_a_summing_reduce_give_the_whole_matrix_basis():
    """Two "ranks" (threads) each hold half of G's rows and sum every product through a shared
    all-reduce: both end with the basis one process computes from the whole G."""
    g = low_rank_plus_noise(60, 36, rank=6, seed=2)
    shards = [g[:30], g[30:]]
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def all_reduce(rank):
        def reduce(t):
            slots[rank] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # nobody overwrites a slot before both have read it
            return total
        return reduce

    def worker(rank):
        results[rank] = sketched_row_basis(shards[rank], 6, seed=5, reduce=all_reduce(rank))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    whole = sketched_row_basis(g, 6, seed=5)
    for q in results:
        torch.testing.assert_close(q, whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_randomized_bases_are_orthonormal_on_every_side(side):
    g = low_rank_plus_noise(70, 45, rank=5)
    p, q = svd_bases(g, 5, side, "randomized_svd", seed=0)
    assert (p is not None) == (side in ("left", "full")) and (q is not None) == (side in ("right", "full"))
    for gram in ([] if p is None else [p.T @ p]) + ([] if q is None else [q @ q.T]):
        torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)
    exact_p, exact_q = svd_bases(g, 5, side, "svd")
    if p is not None:
        assert subspace_overlap(exact_p, p, rows=False) > 0.999
    if q is not None:
        assert subspace_overlap(exact_q, q, rows=True) > 0.999
