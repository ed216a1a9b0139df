import math

import pytest
import torch
from torch import nn

from lit_efficient.core.targets import select_targets
from lit_efficient.sparsity.masks import (
    MASK_BUFFER,
    SparseMasks,
    erk_densities,
    keep_counts,
    random_mask,
    topk_mask,
    uniform_densities,
    zero_optimizer_state,
)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                         nn.Linear(32, 4))


SHAPES = [(64, 16), (64, 64), (32, 64), (8, 3, 3, 3), (128, 128)]


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5])
def test_erk_gives_exactly_the_target_density(density):
    densities = erk_densities(SHAPES, density)
    sizes = [math.prod(s) for s in SHAPES]
    assert sum(d * n for d, n in zip(densities, sizes)) == pytest.approx(density * sum(sizes))
    assert all(0 < d <= 1 for d in densities)
    # proportional to sum(shape)/prod(shape) among the layers that are not dense
    sparse = [i for i, d in enumerate(densities) if d < 1]
    ratios = {round(densities[i] / (sum(SHAPES[i]) / sizes[i]), 9) for i in sparse}
    assert len(ratios) == 1
    counts = keep_counts(SHAPES, densities, total_density=density)
    assert sum(counts) == round(density * sum(sizes))
    assert all(abs(c - d * n) <= 1 for c, d, n in zip(counts, densities, sizes))


def test_erk_makes_small_layers_dense_and_resolves():
    densities = erk_densities(SHAPES, 0.5)
    assert densities[3] == 1.0  # the tiny 8x3x3x3 conv would exceed 1
    assert erk_densities([(4, 4)], 1.0) == [1.0]
    with pytest.raises(ValueError, match="`density`"):
        erk_densities(SHAPES, 0.0)


def test_uniform_and_keep_counts():
    assert uniform_densities(SHAPES, 0.3) == [0.3] * 5
    assert keep_counts([(10,), (10,)], [0.25, 0.25]) == [2, 2]  # round half to even per layer
    assert sum(keep_counts([(10,), (10,)], [0.25, 0.25], total_density=0.25)) == 5


def test_topk_and_random_masks_are_exact():
    scores = torch.tensor([[0.1, 5.0, 3.0], [4.0, 0.0, 2.0]])
    assert topk_mask(scores, 3).tolist() == [[False, True, True], [True, False, False]]
    assert int(topk_mask(torch.randn(50, 7), 123).sum()) == 123
    a = random_mask((20, 30), 77, torch.Generator().manual_seed(3))
    b = random_mask((20, 30), 77, torch.Generator().manual_seed(3))
    assert int(a.sum()) == 77 and torch.equal(a, b)


def prune_half(masks: SparseMasks, optimizer=None):
    new = [topk_mask(p.detach().abs(), p.numel() // 2) for p in masks.params]
    masks.set_masks(new, optimizer)


def make_optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    bnb = pytest.importorskip("bitsandbytes")
    return bnb.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1, min_8bit_size=1)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "adamw8bit"])
def test_pruned_weights_stay_zero_through_optimizer_steps(kind):
    model = mlp()
    masks = SparseMasks(select_targets(model))
    optimizer = make_optimizer(kind, model.parameters())
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for step in range(6):
        if step == 2:
            prune_half(masks, optimizer)  # pruning after state exists: momentum/moments must not revive
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        masks.apply(optimizer)
        assert masks.is_applied()
        if step >= 2:
            for p, m in zip(masks.params, masks.masks):
                for key, value in optimizer.state[p].items():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        if value.dtype == torch.uint8:  # 8-bit: decode through the code book
                            value = optimizer.state[p]["qmap" + key[-1]][value.long()]
                        assert (value[~m] == 0).all(), key
    # the kept half kept learning
    assert masks.density() == pytest.approx(0.5, abs=1e-3)


def test_regrown_positions_start_at_zero_with_zero_state():
    model = mlp()
    masks = SparseMasks(select_targets(model))
    optimizer = make_optimizer("adamw", model.parameters())
    prune_half(masks, optimizer)
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        masks.apply(optimizer)
    p, old = masks.params[0], masks.masks[0].clone()
    # drop 10 active, grow 10 inactive
    active, inactive = old.flatten().nonzero().flatten(), (~old).flatten().nonzero().flatten()
    new = old.clone().flatten()
    new[active[:10]] = False
    new[inactive[:10]] = True
    grown = masks.set_masks([new.view_as(old)] + [m.clone() for m in masks.masks[1:]], optimizer)
    assert grown[0] == 10 and grown[1:] == [0, 0]
    g = new.view_as(old) & ~old
    assert (p[g] == 0).all()
    assert (optimizer.state[p]["exp_avg"][g] == 0).all() and (optimizer.state[p]["exp_avg_sq"][g] == 0).all()
    assert int(masks.masks[0].sum()) == int(old.sum())


def test_masks_are_buffers_with_stable_keys_and_tied_weights_masked_once():
    model = mlp()
    before = set(model.state_dict())
    masks = SparseMasks(select_targets(model))
    keys = set(model.state_dict()) - before
    assert keys == {f"{n}.{MASK_BUFFER}" for n in ("0", "2", "4")}
    # re-registering (e.g. a second setup) keeps the same buffers
    again = SparseMasks(select_targets(model))
    assert all(a is b for a, b in zip(masks.masks, again.masks))
    prune_half(masks)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = mlp()
    SparseMasks(select_targets(fresh))
    fresh.load_state_dict(state)
    assert all(torch.equal(getattr(fresh[i], MASK_BUFFER), getattr(model[i], MASK_BUFFER)) for i in (0, 2, 4))


def test_zero_optimizer_state_ignores_other_shapes():
    p = nn.Parameter(torch.ones(3, 3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    zero_optimizer_state(opt, p, torch.eye(3, dtype=torch.bool))
    assert opt.state[p]["exp_avg"].diagonal().eq(0).all() and opt.state[p]["exp_avg"][0, 1] != 0
    assert float(opt.state[p]["step"]) == 1.0


def test_forward_flops_measured_per_layer():
    from lit_efficient.sparsity.masks import ForwardFlops

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 10), nn.Linear(10, 2))
    targets = select_targets(model, include=["0", "2", "3"])
    probe = ForwardFlops(targets).attach()
    model(torch.randn(4, 3, 5, 5))
    model(torch.randn(1, 3, 5, 5))  # the first call is the one that counts
    probe.detach()
    assert probe.flops == [2.0 * 4 * 8 * 25 * 27, 2.0 * 4 * 10 * 200, 2.0 * 4 * 2 * 10]
    assert not model[0]._forward_hooks
    total = sum(probe.flops)
    expected = (0.5 * probe.flops[0] + 0.1 * probe.flops[1] + probe.flops[2]) / total
    assert probe.ratio([0.5, 0.1, 1.0]) == pytest.approx(expected)


def test_global_magnitude_masks_keeps_largest_active_across_layers():
    from lit_efficient.sparsity.masks import global_magnitude_masks

    w1 = torch.tensor([[5.0, 0.1], [3.0, 9.0]])
    w2 = torch.tensor([[4.0, 8.0, 0.2]])
    m1 = torch.tensor([[True, True], [True, False]])  # 9.0 is inactive: it must not come back
    m2 = torch.ones(1, 3, dtype=torch.bool)
    out = global_magnitude_masks([w1, w2], [m1, m2], keep=3)
    assert out[0].tolist() == [[True, False], [False, False]]
    assert out[1].tolist() == [[True, True, False]]


def test_drop_and_grow_keeps_count_and_uses_scores():
    from lit_efficient.sparsity.masks import drop_and_grow

    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    m = torch.tensor([True, True, True, True, False, False])
    grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 7.0])
    new = drop_and_grow(w, m, 2, grad.abs())
    # drops 1.0 and 2.0; grows position 5 (score 7) and then the best remaining candidate, position 4
    assert new.tolist() == [False, False, True, True, True, True]
    assert int(new.sum()) == int(m.sum())
    # a just-dropped position may regrow when its score is highest
    new = drop_and_grow(w, m, 1, torch.tensor([9.0, 0, 0, 0, 1.0, 2.0]))
    assert new.tolist() == m.tolist()
    assert torch.equal(drop_and_grow(w, m, 0, grad), m)
