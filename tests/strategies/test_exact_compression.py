"""``ExactCompressionDDPStrategy``: DDP that all-reduces only the gradient parts the techniques read.

The parts map back exactly; the hook, on 3 gloo ranks around a real ``DistributedDataParallel``,
gives every gradient plain DDP's value (bit for bit where no technique claims it) and counts the
bytes of the formula; Lightning runs on 2 and 3 CPU ranks end where plain DDP ends for GaLore,
RigL, GraNet, SET, SparCL and mixes, with accumulation and bf16, sending the bytes the shapes, masks and
refresh steps give, and resume bit for bit from a checkpoint taken between updates."""

import json
import os

import pytest
import torch

from lit_efficient.core.gradient_travel import KeptEntries, Projection, kept_indices, merge_parts, project
from tests.ddp_runner import failures_on_gloo_ranks, run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fsdp2_script.py")
SPARCL_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sparsity",
                             "fsdp2_sparcl_script.py")
SHAPES = {"net.0": (64, 16), "net.2": (64, 64), "net.4": (32, 64), "net.6": (4, 32)}  # the test MLP's Linears
ALL_PARAMS = sum(m * n + m for m, n in SHAPES.values())  # weights and biases


def assert_close_states(a, b, atol):
    """Floating-point entries within ``atol`` (0: bit for bit), masks and counters equal."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = torch.tensor(a[key]), torch.tensor(b[key])
        if x.is_floating_point():
            assert (x - y).abs().max().item() <= atol, (key, (x - y).abs().max().item())
        else:
            assert torch.equal(x, y), key


def orthonormal(rows, cols, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_a_projection_written_back_projects_to_the_same_values(side):
    grad = torch.randn(12, 10, generator=torch.Generator().manual_seed(1))
    left = orthonormal(12, 3, 2) if side in ("left", "full") else None
    right = orthonormal(10, 4, 3).T if side in ("right", "full") else None
    part = Projection(left, right)
    packed = part.pack(grad)
    assert packed.numel() == part.numel(grad.shape) == {"left": 3 * 10, "right": 12 * 4, "full": 3 * 4}[side]
    written = torch.full_like(grad, float("nan"))
    part.unpack(packed, written)
    assert torch.allclose(project(written, left, right).reshape(-1), packed, atol=1e-5)
    assert torch.allclose(project(grad, left, right).reshape(-1), packed)


def test_kept_entries_travel_alone_and_the_rest_comes_back_zero():
    grad = torch.randn(6, 5)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) < 0.3
    part = KeptEntries(kept_indices(mask))
    packed = part.pack(grad)
    assert packed.numel() == part.numel(grad.shape) == int(mask.sum())
    written = torch.full_like(grad, float("nan"))
    part.unpack(packed * 2, written)
    assert torch.equal(written, torch.where(mask, grad * 2, torch.zeros_like(grad)))


def test_two_techniques_reading_one_gradient_differently_make_it_travel_whole():
    a, b, c = (torch.nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    kept = KeptEntries(torch.tensor([0, 3]))
    merged = merge_parts([("rigl", a, kept), ("galore", b, Projection(torch.eye(2)[:, :1], None)),
                          ("adaptive", b, None), ("rigl", c, kept), ("other_reader", c, kept)])
    assert merged[id(a)] == ("rigl", kept)
    assert merged[id(b)] == ("galore+adaptive", None)
    assert merged[id(c)] == ("rigl", kept)  # the same part, read twice: still the part


def _hook_on_ranks(rank, world, failures):
    """A real DDP model (several buckets) with the hook, against plain DDP on the same batches."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from lit_efficient.strategies.exact_compression import GradientTraffic, exact_compression_hook

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20), nn.ReLU(), nn.Linear(20, 3))

    plain, exact = (DistributedDataParallel(model(), bucket_cap_mb=0.001) for _ in range(2))  # ~1 KB buckets
    traffic = GradientTraffic()
    exact.register_comm_hook(traffic, exact_compression_hook)
    first, second, head = exact.module[0].weight, exact.module[2].weight, exact.module[4].weight
    left = orthonormal(24, 4, 5)  # first: 24×16, projected on the left (4×16 travels)
    right = orthonormal(24, 5, 6).T  # second: 20×24 on the right (20×5 travels)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(7)) < 0.4
    traffic.plan = merge_parts([("galore", first, Projection(left, None)), ("galore", second, Projection(None, right)),
                                ("rigl", head, KeptEntries(kept_indices(mask)))])
    data = torch.randn(8, 16, generator=torch.Generator().manual_seed(10 + rank))
    for ddp in (plain, exact):
        ddp(data).square().sum().backward()
    params = dict(zip([n for n, _ in exact.module.named_parameters()], zip(plain.parameters(), exact.parameters())))
    for name, (p, e) in params.items():
        if e is first:
            expected = left @ (left.T @ p.grad)
        elif e is second:
            expected = p.grad @ right.T @ right
        elif e is head:
            expected = torch.where(mask, p.grad, torch.zeros_like(p.grad))
        else:  # no technique claims it: DDP's average (summed in another order beside packed parts)
            expected = p.grad
        gap = (e.grad - expected).abs().max().item()
        if gap > 1e-5:
            failures.append((rank, name, gap))
    sent = {"galore": 4 * (4 * 16 + 20 * 5), "rigl": 4 * int(mask.sum()),
            "other": 4 * (24 + 20 + 3)}  # the biases travel whole
    whole = {"galore": 4 * (24 * 16 + 20 * 24), "rigl": 4 * 60, "other": 4 * 47}
    if dict(traffic.step_sent) != sent or dict(traffic.step_whole) != whole:
        failures.append((rank, "bytes", dict(traffic.step_sent), dict(traffic.step_whole)))
    # with nothing claimed the hook is DDP's own all-reduce: bit for bit
    traffic.plan = {}
    for ddp in (plain, exact):
        ddp.zero_grad()
        ddp(data * 2).square().sum().backward()
    for name, (p, e) in params.items():
        if not torch.equal(e.grad, p.grad):
            failures.append((rank, name, "differs from DDP's with nothing claimed"))
    if dist.get_world_size() != world:
        failures.append((rank, "world"))


def test_the_hook_gives_each_gradient_its_part_of_plain_ddps_and_counts_the_bytes():
    failures = failures_on_gloo_ranks(_hook_on_ranks, 3)
    assert not failures, failures[:4]


# -- Lightning runs -------------------------------------------------------------------------------

def ranks_run(tmp_path, entry, strategy, options, folder=None):
    path = tmp_path / (folder or strategy)
    path.mkdir()
    return run_ddp_script(SCRIPT, [entry, strategy, json.dumps(options)], path, ranks=options.get("ranks", 2))


def galore_expected_bytes(step):
    """GaLore (rank 8, gap 3) on net.0, net.2 (right side: m×8 travels) and net.4 (left: 8×n); whole
    on its refresh steps 1, 4, 7, 10 (each starts from the bases of the step before)."""
    if step % 3 == 1:
        return 4 * sum(m * n for m, n in list(SHAPES.values())[:3])
    return 4 * (64 * 8 + 64 * 8 + 8 * 64)


# entry -> (options): the same run under plain DDP and under ddp_exact_compression
RUNS = {
    "galore": dict(steps=12),
    "rigl": dict(steps=12),
    "granet": dict(steps=12),
    "granet_momentum": dict(steps=12),
    "set": dict(steps=12),
    "exact_mix": dict(steps=12, accumulate=2),
    "galore_adaptive": dict(steps=12),
    "galore_bf16": dict(steps=12, precision="bf16-mixed"),
    "galore_3": dict(steps=12, ranks=3),
    "rigl_3": dict(steps=12, ranks=3),
}


# of plain DDP's bytes over the run: GraNet prunes gradually from dense; AutoFreeze's checks send whole
SENT_AT_MOST = {"galore": 0.55, "rigl": 0.6, "granet": 0.9, "granet_momentum": 1.0001, "set": 0.45, "exact_mix": 0.6,
                "galore_adaptive": 0.8}


@pytest.mark.parametrize("name", list(RUNS))
def test_ends_where_plain_ddp_ends(tmp_path, name):
    entry, options = name.removesuffix("_3").removesuffix("_bf16"), RUNS[name]
    plain = ranks_run(tmp_path, entry, "ddp", options)
    exact = ranks_run(tmp_path, entry, "exact", options)
    assert exact["world_size"] == options.get("ranks", 2) and exact["step"] == plain["step"] == 12
    assert_close_states(exact["state"], plain["state"], atol=2e-5)
    facts, traffic = exact["facts"], exact["facts"].pop("traffic")
    exact["facts"].pop("savings")
    last = traffic[-1]  # the progress bar ends on the last step's share of plain DDP's bytes
    shown = round(100 * sum(last["sent"].values()) / sum(last["whole"].values()), 1)
    assert exact["facts"].pop("sent_shown") == pytest.approx(shown)  # (logged as float32)
    assert facts == plain["facts"]  # the same masks, frozen blocks, optimizer state
    assert [t["step"] for t in traffic] == list(range(1, 13))
    for record in traffic:
        assert sum(record["whole"].values()) == 4 * ALL_PARAMS, record  # every gradient, once per step
    sent = sum(sum(record["sent"].values()) for record in traffic)
    assert sent < SENT_AT_MOST[entry] * 12 * 4 * ALL_PARAMS, sent / (12 * 4 * ALL_PARAMS)
    if entry == "galore":
        for record in traffic:
            assert record["sent"]["galore"] == galore_expected_bytes(record["step"]), record
            assert record["sent"]["other"] == record["whole"]["other"]
    if entry == "rigl":  # 80% sparse net.0, net.2 and net.4 (the head stays dense); updates at 3, 6, 9
        kept, sizes = sum(facts["nonzeros"]), sum(facts["sizes"])
        assert sizes == sum(m * n for m, n in list(SHAPES.values())[:3])
        for record in traffic:
            expected = 4 * (sizes if record["step"] in (3, 6, 9) else kept)
            assert record["sent"]["rigl"] == expected, record
    if entry == "granet_momentum":  # the momentum of the dense gradients is averaged on every step
        assert all(record["sent"]["granet"] == record["whole"]["granet"] for record in traffic)
    if entry == "set":  # random regrowth: no step needs the dense gradient
        assert {record["sent"]["set"] for record in traffic} == {4 * sum(facts["nonzeros"])}


def test_galore_and_a_gradient_norm_check_on_the_same_matrices_send_them_whole_on_check_steps(tmp_path):
    """AutoFreeze compares gradient norms every 2 steps from step 2: those steps send GaLore's
    matrices whole (as AutoFreeze must see them), the others their projections."""
    exact = ranks_run(tmp_path, "galore_adaptive", "exact", dict(steps=12))
    for record in exact["facts"]["traffic"]:
        checked = record["step"] % 2 == 0
        refresh = record["step"] % 3 == 1
        assert ("freezing+galore" in record["sent"]) == checked, record
        if not checked and not refresh:  # blocks AutoFreeze froze left the optimizer: GaLore projects fewer
            assert 0 < record["sent"]["galore"] <= galore_expected_bytes(record["step"]), record
            assert record["sent"]["galore"] < record["whole"]["galore"] / 3, record


def test_the_savings_table_reports_the_bytes_against_plain_ddp(tmp_path):
    exact = ranks_run(tmp_path, "rigl", "exact", dict(steps=12))
    rows = {quantity: (value, ratio) for quantity, value, ratio in exact["facts"]["savings"]}
    total = rows["gradient bytes all-reduced per step (per rank)"]
    rigl = rows["gradients of rigl's targets"]
    assert 0 < rigl[1] < total[1] < 1
    sent = sum(sum(r["sent"].values()) for r in exact["facts"]["traffic"])
    assert total[1] == pytest.approx(sent / (12 * 4 * ALL_PARAMS))


def test_resumes_bit_for_bit_from_a_checkpoint_between_updates(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    options = dict(steps=12, save_every=8, checkpoints=str(checkpoints))
    straight = ranks_run(tmp_path, "exact_mix", "exact", options)
    saved = sorted(checkpoints.glob("*step=8*"))
    assert len(saved) == 1
    resumed = ranks_run(tmp_path, "exact_mix", "exact", dict(steps=12, resume=str(saved[0])), folder="resumed")
    assert resumed["step"] == straight["step"] == 12
    assert_close_states(resumed["state"], straight["state"], atol=0.0)
    assert resumed["facts"]["traffic"] == straight["facts"]["traffic"][-len(resumed["facts"]["traffic"]):]
    assert resumed["facts"]["savings"] == straight["facts"]["savings"]  # the totals came with the checkpoint


def test_sparcl_ends_where_plain_ddp_ends(tmp_path):
    """Across a task boundary, with gradient masks, data removal and rehearsal (DER++)."""
    runs = {}
    for strategy in ("ddp", "ddp_exact_compression"):
        (tmp_path / strategy).mkdir()
        runs[strategy] = run_ddp_script(SPARCL_SCRIPT, [strategy, json.dumps({})], tmp_path / strategy)
    plain, exact = runs["ddp"], runs["ddp_exact_compression"]
    for key in ("grad_masks", "removed", "events", "step", "updates", "task"):
        assert exact[key] == plain[key], key
    for key, value in plain["state"].items():
        assert torch.allclose(torch.tensor(exact["state"][key]).double(), torch.tensor(value).double(), atol=2e-5), key
    sent, whole = exact["traffic"]
    assert sent["sparcl"] < 0.3 * whole["sparcl"]  # 75% sparse: only the active quarter travels


def test_without_a_technique_that_reads_part_of_a_gradient_it_is_plain_ddp_bit_for_bit(tmp_path):
    plain = ranks_run(tmp_path, "loss_reweighting", "ddp", dict(steps=12))
    exact = ranks_run(tmp_path, "loss_reweighting", "exact", dict(steps=12))
    assert_close_states(exact["state"], plain["state"], atol=0.0)
    for record in exact["facts"]["traffic"]:
        assert record["sent"] == record["whole"] == {"other": 4 * ALL_PARAMS}, record


@pytest.mark.parametrize("argument", ["ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period"])
def test_a_hook_of_ones_own_is_refused_naming_the_argument(argument):
    from lit_efficient import ExactCompressionDDPStrategy

    with pytest.raises(ValueError, match=f"`{argument}`"):
        ExactCompressionDDPStrategy(**{argument: 1})


def test_the_progress_bar_entry_can_be_switched_off_and_its_flag_is_checked():
    from lit_efficient import ExactCompressionDDPStrategy

    assert ExactCompressionDDPStrategy().report.progress_bar is True
    assert ExactCompressionDDPStrategy(progress_bar=False).report.progress_bar is False
    with pytest.raises(ValueError, match="`progress_bar`"):
        ExactCompressionDDPStrategy(progress_bar="yes")


def test_the_strategy_is_registered_by_name():
    from lightning.pytorch.strategies import StrategyRegistry

    from lit_efficient import ExactCompressionDDPStrategy

    assert isinstance(StrategyRegistry.get("ddp_exact_compression"), ExactCompressionDDPStrategy)


def test_a_lightning_cli_yaml_selects_it_by_name(tmp_path, monkeypatch):
    from lit_efficient import ExactCompressionDDPStrategy
    from lit_efficient.cli import main

    config = tmp_path / "ddp.yaml"
    config.write_text("model:\n  class_path: cli_models.TinyRegressor\ndata:\n  class_path: cli_models.TinyData\n"
                      "trainer:\n  accelerator: cpu\n  devices: 2\n  strategy: ddp_exact_compression\n"
                      "  callbacks:\n    - class_path: lit_efficient.RigL\n      init_args: {sparsity: 0.5}\n")
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cli = main(["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.trainer.strategy, ExactCompressionDDPStrategy)


def test_tensorboard_shows_the_bytes_of_every_step_per_technique(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exact = ranks_run(tmp_path, "exact_mix", "exact", dict(steps=12, logger=True))
    events = EventAccumulator(str(tmp_path / "exact" / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("sent_mib", "sent_ratio", "sent_ratio/galore", "sent_ratio/rigl", "sent_ratio/other"):
        assert f"efficient/exact_ddp/{tag}" in tags, sorted(tags)
    logged = [e.value for e in events.Scalars("efficient/exact_ddp/sent_mib")]
    counted = [sum(r["sent"].values()) / 2**20 for r in exact["facts"]["traffic"]]
    assert len(logged) == 12 and logged == pytest.approx(counted)
    # rank 0 alone wrote the savings table beside the events (no collective from one rank: it once hung)
    assert "exact_ddp" in (tmp_path / "exact" / "tb" / "version_0" / "savings.md").read_text()
