"""GaLoreAdamW without Lightning: equality with AdamW at full rank, state memory formulas, 8-bit
moments, weights_only round trips, SVD failures, variants that learn, and bad input."""

import io
import math

import pytest
import torch

from lit_efficient import GaLoreAdamW
from lit_efficient.lowrank import optim as galore_optim
from lit_efficient.lowrank.optim import galore_state_numel, state_bytes
from lit_efficient.lowrank.projector import project, project_back, projection_side, random_bases, svd_bases


def matrix(m=48, n=24, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Parameter(torch.randn(m, n))


def run(opt, params, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_full_rank_equals_torch_adamw(proj_type):
    w, ref = matrix(), matrix()
    bias, ref_bias = torch.nn.Parameter(torch.zeros(48)), torch.nn.Parameter(torch.zeros(48))
    ours = GaLoreAdamW([{"params": [w, bias], "rank": 24, "scale": 1.0, "proj_type": proj_type}], lr=1e-2,
                       weight_decay=0.1)
    theirs = torch.optim.AdamW([ref, ref_bias], lr=1e-2, weight_decay=0.1)
    run(ours, [w, bias])
    run(theirs, [ref, ref_bias])
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(bias, ref_bias)


def test_projection_maps_by_hand():
    g = torch.randn(6, 4)
    for proj_type, side in (("std", "right"), ("reverse_std", "left"), ("full", "full")):
        assert projection_side((6, 4), proj_type) == side
        p, q = svd_bases(g, 4, side, "svd")  # full rank: project then back is the identity
        torch.testing.assert_close(project_back(project(g, p, q), p, q), g, atol=1e-5, rtol=1e-5)
    assert projection_side((4, 6), "std") == "left"
    a, b = random_bases((6, 4), 2, "full", seed=3, device=torch.device("cpu"))
    c, d = random_bases((6, 4), 2, "full", seed=3, device=torch.device("cpu"))
    assert torch.equal(a, c) and torch.equal(b, d)  # regenerated identically from the seed


@pytest.mark.parametrize("shape,rank,proj_type", [((48, 24), 6, "std"), ((24, 48), 6, "std"), ((48, 24), 8, "left"),
                                                   ((48, 24), 4, "full")])
def test_state_memory_matches_the_formula(shape, rank, proj_type):
    w = torch.nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([{"params": [w], "rank": rank, "proj_type": proj_type}])
    run(opt, [w], steps=2)
    m, n = shape
    if proj_type == "std":
        assert galore_state_numel(shape, rank) == 2 * rank * max(m, n) + rank * min(m, n)
    assert state_bytes(opt) == 4 * galore_state_numel(shape, rank, proj_type)
    assert state_bytes(opt) < 2 * 4 * m * n  # AdamW's


def test_eight_bit_moments_take_about_a_quarter():
    shape, rank = (256, 128), 32
    full, eight = matrix(*shape), matrix(*shape)
    opt32 = GaLoreAdamW([{"params": [full], "rank": rank}])
    opt8 = GaLoreAdamW([{"params": [eight], "rank": rank, "eight_bit": True}])
    run(opt32, [full], steps=3)
    run(opt8, [eight], steps=3)
    moments32 = 2 * 4 * 256 * rank
    moments8 = state_bytes(opt8) - 4 * rank * 128  # minus the fp32 basis
    assert 0.24 < moments8 / moments32 < 0.27  # 1 byte per element plus one fp32 scale per 256
    assert (eight - full).abs().max() < 0.05  # and the updates stay close to the 32-bit ones


def test_random_projection_stores_no_basis():
    w = matrix()
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "projection": "random"}])
    run(opt, [w], steps=2)
    assert state_bytes(opt) == 4 * galore_state_numel((48, 24), 6, stored_basis=False)


@pytest.mark.parametrize("options", [dict(), dict(eight_bit=True), dict(projection="random"), dict(fira=True)])
def test_state_dict_round_trip_weights_only_and_same_subspace(options):
    w, twin = matrix(), matrix()
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 4, **options}], lr=1e-2)
    run(opt, [w], steps=5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin.data.copy_(w.data)
    other = GaLoreAdamW([{"params": [twin], "rank": 6, "update_proj_gap": 4, **options}], lr=1e-2)
    other.load_state_dict(state)
    run(opt, [w], steps=2, seed=7)  # steps 6-7: inside the gap, on the restored basis
    run(other, [twin], steps=2, seed=7)
    assert torch.equal(w, twin)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(eight_bit=True), dict(fira=True), dict(projection="random")])
def test_half_precision_matrices_resume_bit_exactly(dtype, options):
    """torch casts loaded state to the parameter's dtype: fp32 moments and bases of a bf16/fp16 matrix
    must still come back exactly as saved, and the run continue exactly."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 24).to(dtype))
    bias = torch.nn.Parameter(torch.randn(24).to(dtype))  # plain AdamW state, in the parameter's dtype
    twin, twin_bias = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(bias.detach().clone())

    def build(matrix, vector):
        return GaLoreAdamW([{"params": [matrix], "rank": 6, "update_proj_gap": 3, **options}, {"params": [vector]}],
                           lr=1e-2)

    def steps(opt, params, count, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(count):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()

    opt = build(w, bias)
    steps(opt, [w, bias], 4, seed=1)  # a refresh at step 3: the basis came from a half-precision gradient
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin.data.copy_(w.data)
    twin_bias.data.copy_(bias.data)
    other = build(twin, twin_bias)
    other.load_state_dict(saved)
    for p, q in ((w, twin), (bias, twin_bias)):
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                restored = other.state[q][key]
                assert restored.dtype == value.dtype and torch.equal(restored, value), key
            else:
                assert other.state[q][key] == value, key
    if not options.get("eight_bit") and options.get("projection") != "random":
        assert opt.state[w]["exp_avg"].dtype == torch.float32 and opt.state[w]["basis_right"].dtype == torch.float32
    steps(opt, [w, bias], 4, seed=7)  # through the next refresh
    steps(other, [twin, twin_bias], 4, seed=7)
    assert torch.equal(w, twin) and torch.equal(bias, twin_bias)


def test_matrix_seeds_do_not_depend_on_which_parameter_got_state_first():
    """Each matrix's seed (random projections, fallback bases) is its position in the optimizer."""
    a, b = matrix(seed=1), matrix(seed=2)
    first = GaLoreAdamW([{"params": [a, b], "rank": 6, "projection": "random"}])
    b.grad = torch.randn(b.shape)
    first.step()  # b gets state before a
    a.grad = torch.randn(a.shape)
    first.step()
    a2, b2 = matrix(seed=1), matrix(seed=2)
    second = GaLoreAdamW([{"params": [a2, b2], "rank": 6, "projection": "random"}])
    a2.grad, b2.grad = torch.randn(a2.shape), torch.randn(b2.shape)
    second.step()  # both at once
    assert [first.state[p]["index"] for p in (a, b)] == [second.state[p]["index"] for p in (a2, b2)] == [0, 1]


def test_failed_svd_keeps_the_previous_basis(monkeypatch):
    w = matrix()
    opt = GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 2}])
    run(opt, [w], steps=1)
    before = opt.state[w]["basis_right"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(galore_optim, "svd_bases", broken)
    with pytest.warns(UserWarning, match="keeping the previous basis"):
        run(opt, [w], steps=2)  # step 2 is a refresh
    assert torch.equal(opt.state[w]["basis_right"], before) and torch.isfinite(w).all()
    fresh = matrix()
    opt = GaLoreAdamW([{"params": [fresh], "rank": 6}])
    with pytest.warns(UserWarning, match="random basis"):
        run(opt, [fresh], steps=1)
    q = opt.state[fresh]["basis_right"]
    torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-5, rtol=1e-5)  # orthonormal fallback


@pytest.mark.parametrize("options", [dict(), dict(projection="randomized_svd"), dict(projection="random"),
                                     dict(fira=True), dict(eight_bit=True),
                                     dict(proj_type="full", scale=10.0)])  # r×r core: singular values, bigger steps
def test_each_variant_fits_a_low_rank_regression(options):
    torch.manual_seed(0)
    target = torch.randn(48, 4) @ torch.randn(4, 24)
    w = torch.nn.Parameter(torch.zeros(48, 24))
    opt = GaLoreAdamW([{"params": [w], "rank": 4, "update_proj_gap": 10, "scale": 1.0, **options}], lr=5e-2,
                      weight_decay=0.0)
    start = float(((w.detach() - target) ** 2).mean())
    for _ in range(150):
        w.grad = (w.detach() - target)
        opt.step()
    assert float(((w - target) ** 2).mean()) < 0.2 * start


VARIANT_FUNCTIONS = ("moments_fp32", "moments_8bit", "svd_refresh", "random_projection_bases", "galore_update",
                     "apollo_update", "fira_residual")


@pytest.mark.parametrize("options,expected", [
    (dict(), {"moments_fp32", "svd_refresh", "galore_update"}),
    (dict(projection="randomized_svd"), {"moments_fp32", "svd_refresh", "galore_update"}),
    (dict(eight_bit=True), {"moments_8bit", "svd_refresh", "galore_update"}),
    (dict(fira=True), {"moments_fp32", "svd_refresh", "galore_update", "fira_residual"}),
    (dict(fira=True, eight_bit=True), {"moments_8bit", "svd_refresh", "galore_update", "fira_residual"}),
    (dict(projection="random"), {"moments_fp32", "random_projection_bases", "apollo_update"}),
    (dict(projection="random", eight_bit=True), {"moments_8bit", "random_projection_bases", "apollo_update"}),
])
def test_the_optimizer_dispatches_to_each_variant_function(monkeypatch, options, expected):
    """Each variant lives in its own function; the optimizer picks exactly the ones its group asks
    for (their results are checked by the round-trip, regression and half-precision tests above)."""
    called = set()

    def spy(name, function):
        def wrapped(*args, **kwargs):
            called.add(name)
            return function(*args, **kwargs)
        return wrapped

    for name in VARIANT_FUNCTIONS:
        monkeypatch.setattr(galore_optim, name, spy(name, getattr(galore_optim, name)))
    w = matrix()
    run(GaLoreAdamW([{"params": [w], "rank": 6, "update_proj_gap": 2, **options}]), [w], steps=3)
    assert called == expected


def test_fira_limits_the_residual_norm_growth():
    """Fira's limiter: a residual whose norm jumps is scaled to 1.01× the previous step's norm."""
    torch.manual_seed(0)
    grad = torch.randn(48, 24)
    p, q = svd_bases(grad, 6, "right", "svd")
    low = project(grad, p, q)
    direction = torch.randn_like(low)
    state = {}
    first = galore_optim.fira_residual(state, grad, low, direction, 1.0, (p, q), "right")
    assert float(state["fira_norm"]) == pytest.approx(float(first.norm()))
    bigger = galore_optim.fira_residual(state, grad, low, direction, 10.0, (p, q), "right")  # 10× the norm
    assert float(bigger.norm()) == pytest.approx(1.01 * float(first.norm()), rel=1e-5)
    assert float(state["fira_norm"]) == pytest.approx(1.01 * float(first.norm()), rel=1e-5)
    smaller = galore_optim.fira_residual(state, grad, low, direction, 0.5, (p, q), "right")
    assert float(smaller.norm()) == pytest.approx(0.5 * float(first.norm()), rel=1e-5)  # shrinking is not limited


def test_non_2d_parameters_and_groups_without_rank_get_plain_adamw():
    w, bias, conv = matrix(), torch.nn.Parameter(torch.randn(48)), torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    ref_bias, ref_conv = torch.nn.Parameter(bias.detach().clone()), torch.nn.Parameter(conv.detach().clone())
    opt = GaLoreAdamW([{"params": [w, bias, conv], "rank": 6}], lr=1e-2)
    theirs = torch.optim.AdamW([ref_bias, ref_conv], lr=1e-2)
    run(opt, [w, bias, conv], steps=3)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn((48, 24), generator=g)
        ref_bias.grad, ref_conv.grad = torch.randn(48, generator=g), torch.randn((4, 3, 3, 3), generator=g)
        theirs.step()
    torch.testing.assert_close(bias, ref_bias)
    torch.testing.assert_close(conv, ref_conv)
    assert "basis_right" in opt.state[w] and "basis_right" not in opt.state[bias]


@pytest.mark.parametrize("group,match", [
    (dict(rank=0), "rank"), (dict(rank=-2), "rank"), (dict(rank=25), "larger"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=4, proj_type="diagonal"), "proj_type"), (dict(rank=4, projection="qr"), "projection"),
    (dict(rank=4, scale=0.0), "scale"),
])
def test_bad_groups_are_refused(group, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW([{"params": [matrix()], **group}])


def test_overlap_is_one_for_an_unchanged_subspace():
    from lit_efficient.lowrank.projector import subspace_overlap

    q = torch.linalg.qr(torch.randn(24, 6))[0].T
    assert subspace_overlap(q, q, rows=True) == pytest.approx(1.0, abs=1e-5)
    other = torch.linalg.qr(torch.randn(24, 6))[0].T
    assert subspace_overlap(q, other, rows=True) < 0.9
    assert math.isfinite(subspace_overlap(q.T, other.T, rows=False))


@pytest.mark.parametrize("shape,side", [((32, 80), "left"), ((80, 32), "right"), ((80, 32), "left")])
def test_gram_eigenvectors_span_the_svd_subspace(shape, side):
    from lit_efficient.lowrank.projector import subspace_overlap

    torch.manual_seed(0)
    g = torch.randn(*shape) @ torch.diag(torch.linspace(3, 0.1, shape[1]))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    p, q = svd_bases(g, 8, side, "svd")
    if side == "left":
        assert subspace_overlap(u[:, :8], p, rows=False) == pytest.approx(1.0, abs=1e-4)
    else:
        assert subspace_overlap(vh[:8], q, rows=True) == pytest.approx(1.0, abs=1e-4)
