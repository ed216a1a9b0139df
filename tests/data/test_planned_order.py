"""The planned-order sampler on its own: how a planned epoch order is split across ranks and where a
resumed epoch starts."""

from types import SimpleNamespace

import pytest
import torch

from lit_efficient.data.planned_order import PlannedOrderSampler


def owner(order, trained_batches=0, batch_size=2):
    return SimpleNamespace(order=torch.tensor(order), trained_batches=trained_batches, planned_batch_size=batch_size,
                           local_order=None)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_ranks_take_interleaved_shares_that_cover_the_order(ranks):
    plan = owner([7, 3, 9, 1, 4])
    shares = [list(PlannedOrderSampler(range(10), plan, ranks, r)) for r in range(ranks)]
    assert all(len(s) == len(PlannedOrderSampler(range(10), plan, ranks, 0)) for s in shares)
    padded = [7, 3, 9, 1, 4, 7, 3, 9][: len(shares[0]) * ranks]  # wraps around to a multiple of the ranks
    assert [shares[i % ranks][i // ranks] for i in range(len(padded))] == padded


def test_a_resumed_epoch_starts_at_its_first_untrained_batch():
    plan = owner([5, 6, 7, 8, 9, 0], trained_batches=2, batch_size=2)
    sampler = PlannedOrderSampler(range(10), plan)
    assert list(sampler) == [9, 0]
    assert plan.local_order.tolist() == [5, 6, 7, 8, 9, 0]  # the whole share, for the batches' indices


def test_nothing_is_read_before_the_first_sample_is_asked_for():
    plan = owner([1, 2])
    iterator = iter(PlannedOrderSampler(range(3), plan))
    plan.order = torch.tensor([2, 1])  # a checkpoint restored after the loader was built
    assert list(iterator) == [2, 1]
