"""What a basis refresh does to the Adam moments (issue: the update must depend on the subspace, not
on the signs a decomposition happens to return): ``"align"`` and ``"rotate"`` make the next update
independent of the signs of the new basis vectors, ``"rotate"`` also of their order, and
``"keep"`` (galore-torch's behaviour) does not."""

import pytest
import torch

import lit_efficient
from lit_efficient import GaLoreAdamW
from lit_efficient.lowrank import optim as galore_optim
from lit_efficient.lowrank.optim import basis_change, rotate_moments
from lit_efficient.lowrank.projector import svd_bases

SHAPES = [(48, 24), (24, 48), (32, 32)]  # tall (left basis), wide (right basis), square


def train(shape, how, steps=9, gap=4, eight_bit=False, fira=False, projection="svd", seed=0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": gap, "scale": 1.0, "moments_on_refresh": how,
                        "eight_bit": eight_bit, "fira": fira, "projection": projection}], lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(shape[0], 8, generator=g), torch.randn(8, shape[1], generator=g)
    for _ in range(steps):  # gradients near a slowly turning low-rank subspace, as in training
        w.grad = mix[0] @ torch.diag(torch.linspace(3, 1, 8)) @ mix[1] + 0.1 * torch.randn(*shape, generator=g)
        mix = mix[0] + 0.2 * torch.randn(mix[0].shape, generator=g), mix[1]
        opt.step()
    return w.detach().clone()


def flipping(monkeypatch, permute=False):
    """Make every refresh after the first return the same subspace with some vectors' signs flipped,
    others at each refresh (and, with ``permute``, the vectors in reverse order)."""
    calls = []

    def flipped(grad, rank, side, method, seed=0):
        p, q = svd_bases(grad, rank, side, method, seed)
        calls.append(1)
        if len(calls) == 1:
            return p, q
        signs = torch.tensor([(-1.0) ** (i + len(calls)) for i in range(rank)])
        order = torch.arange(rank).flip(0) if permute else torch.arange(rank)
        p = None if p is None else (p * signs)[:, order]
        q = None if q is None else (q * signs.unsqueeze(1))[order]
        return p, q

    monkeypatch.setattr(galore_optim, "svd_bases", flipped)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("how", ["align", "rotate"])
def test_flipping_signs_at_a_refresh_leaves_the_updates_unchanged(monkeypatch, shape, how):
    plain = train(shape, how)
    flipping(monkeypatch)
    torch.testing.assert_close(train(shape, how), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_kept_moments_depend_on_the_signs(monkeypatch, shape):
    plain = train(shape, "keep")
    flipping(monkeypatch)
    assert (train(shape, "keep") - plain).abs().max() > 1e-3  # what "align" and "rotate" remove


@pytest.mark.parametrize("shape", SHAPES)
def test_rotated_moments_do_not_depend_on_the_order_of_the_basis_vectors(monkeypatch, shape):
    plain = train(shape, "rotate")
    flipping(monkeypatch, permute=True)
    torch.testing.assert_close(train(shape, "rotate"), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(eight_bit=True), dict(fira=True), dict(projection="randomized_svd")])
@pytest.mark.parametrize("how", ["align", "rotate"])
def test_sign_invariance_holds_for_every_decomposed_variant(monkeypatch, options, how):
    plain = train((48, 24), how, **options)
    flipping(monkeypatch)
    torch.testing.assert_close(train((48, 24), how, **options), plain, rtol=1e-5, atol=1e-6)


def test_rotation_into_the_same_subspace_is_exact_for_the_first_moment():
    torch.manual_seed(0)
    q_old = torch.linalg.qr(torch.randn(20, 5))[0].T  # 5×20 orthonormal rows
    turn = torch.linalg.qr(torch.randn(5, 5))[0]
    q_new = turn @ q_old  # the same subspace, another basis
    exp_avg, exp_avg_sq = torch.randn(7, 5), torch.rand(7, 5)
    left, right = basis_change((None, q_old), (None, q_new))
    moved, moved_sq = rotate_moments(exp_avg, exp_avg_sq, (left, right))
    torch.testing.assert_close(moved @ q_new, exp_avg @ q_old)  # the same full-space first moment
    assert (moved_sq >= 0).all()
    torch.testing.assert_close(moved_sq.sum(), exp_avg_sq.sum(), rtol=1e-5, atol=1e-5)  # mass kept under rotation


def test_the_default_rotates_and_the_reference_switch_is_checked():
    w = torch.nn.Parameter(torch.randn(8, 4))
    assert GaLoreAdamW([{"params": [w], "rank": 2}]).param_groups[0]["moments_on_refresh"] == "rotate"
    assert lit_efficient.GaLore().moments_on_refresh == "rotate"
    with pytest.raises(ValueError, match="moments_on_refresh"):
        GaLoreAdamW([{"params": [w], "rank": 2, "moments_on_refresh": "reset"}])


def test_a_group_from_an_older_checkpoint_keeps_its_moments_as_it_ran():
    # torch's load_state_dict restores the saved group, which has no `moments_on_refresh`
    shape, results = (48, 24), []
    for how in ("keep", None):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(*shape))
        opt = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 3, "moments_on_refresh": how or "align"}])
        if how is None:
            del opt.param_groups[0]["moments_on_refresh"]
        g = torch.Generator().manual_seed(1)
        for _ in range(7):
            w.grad = torch.randn(*shape, generator=g)
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_reference_switch_equals_galore_torch_in_the_first_projection_window(shape):
    """``"keep"`` is galore-torch's behaviour: until the first refresh after the initial basis the two
    optimizers take the same steps (the first window does not depend on the basis signs at all)."""
    reference = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    start = torch.randn(*shape)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    group = {"rank": 6, "update_proj_gap": 4, "scale": 0.5}
    ours_opt = GaLoreAdamW([{"params": [ours], **group, "moments_on_refresh": "keep"}], lr=1e-2, eps=1e-8,
                           weight_decay=0.0)
    theirs_opt = reference.GaLoreAdamW([{"params": [theirs], **group, "proj_type": "std"}], lr=1e-2, eps=1e-8,
                                       weight_decay=0.0, no_deprecation_warning=True)
    g = torch.Generator().manual_seed(1)
    # a clear gap after the 6th singular value: both decompositions find the same subspace to float precision
    u, v = torch.randn(shape[0], 6, generator=g), torch.randn(6, shape[1], generator=g)
    for _ in range(4):  # steps 0-3: the basis from step 0
        grad = u @ torch.diag(torch.linspace(4, 2, 6)) @ v + 0.05 * torch.randn(*shape, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-4, atol=1e-5)
    assert (ours.detach() - start).abs().max() > 1e-3  # they moved
