"""``lit_efficient.core.shards``: the k largest of values split over ranks are exactly the k largest
of the whole (ties to the lower position), for every k, with the complement taken past half, on 3
gloo ranks holding uneven parts; counts add up over ranks."""


import torch
import torch.distributed as dist

from lit_efficient.core.shards import Span, counts, largest
from tests.ddp_runner import failures_on_gloo_ranks


def whole_values():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 6, (23,), generator=g).float()  # few distinct values: many ties


def test_ties_go_to_the_lower_index_in_one_process():
    values = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert largest(values, 2).tolist() == [False, True, True, False, False, False]
    assert largest(values, 0).sum() == 0 and largest(values, 9).all()


def test_a_whole_tensor_spans_itself():
    span = Span.of(torch.zeros(4, 3))
    assert (span.start, span.numel, span.group, span.whole) == (0, 12, None, 12)


def _ranks(rank: int, world: int, failures) -> None:
    values = whole_values()
    bounds = [0, 10, 10, 23]  # uneven parts, one of them empty
    here = values[bounds[rank]: bounds[rank + 1]]
    positions = torch.arange(bounds[rank], bounds[rank + 1])
    group = dist.group.WORLD
    for k in range(values.numel() + 1):
        expected = largest(values, k)[bounds[rank]: bounds[rank + 1]]
        got = largest(here, k, positions, group)
        if not torch.equal(got, expected):
            failures.append((rank, k, got.tolist(), expected.tolist()))
    if counts([here > 2, here >= 0], group) != [int((values > 2).sum()), values.numel()]:
        failures.append((rank, "counts"))


def test_the_k_largest_over_uneven_ranks_are_the_whole_tensors():
    failures = failures_on_gloo_ranks(_ranks, 3)
    assert not failures, failures[:3]
