"""GaLore under FSDP2 (``ModelParallelStrategy``, ``fully_shard`` per Linear, CPU ranks over gloo).

GaLoreAdamW steps each matrix from this rank's rows of its gradient and ends where one process ends
on the same global batches, within float tolerance, for every basis (svd, randomized_svd, random),
Fira and 8-bit moments, and on 3 ranks, where the rows split unevenly (the head's 4 rows: 2, 2 and
0). Every moment (m×r on the right side, r×n on the left) and the left side's basis hold this rank's
rows: half of one process's on 2 ranks; Q is whole on every rank unless ``shard_basis`` splits it too.
Runs resume bit for bit from a distributed (sharded) and from a full checkpoint taken after refreshes.

The test MLP's targets: net.0 (64×16) and net.2 (64×64) project on the right, net.4 (32×64) on the
left; ``galore_every_linear`` adds the head net.6 (4×32, left) at rank 3."""

import json
import math
import os

import pytest
import torch

from lit_efficient.lowrank.optim import BLOCK, quantize_8bit
from lit_efficient.lowrank.projector import projection_side
from tests.ddp_runner import run_ddp_script
from tests.test_fsdp2 import assert_close_states

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_script.py")
SHAPES = {"net.0": (64, 16), "net.2": (64, 64), "net.4": (32, 64), "net.6": (4, 32)}


def sharded_run(tmp_path, entry, options, folder="fsdp2"):
    path = tmp_path / folder
    path.mkdir()
    return run_ddp_script(SCRIPT, [entry, "fsdp2", json.dumps(options)], path, ranks=options.get("ranks", 2))


def one_process(tmp_path, entry, options):
    from tests.fsdp2_script import facts, fit, full_state

    trainer, model = fit(entry, "one", options, str(tmp_path))
    return trainer.global_step, full_state(model), facts(trainer)


def expected_bytes_on_rank_0(name: str, key: str, alone: int, ranks: int, rank: int, shard_basis: bool) -> int:
    """Bytes of state entry ``key`` of matrix ``name`` on rank 0, from one process's ``alone``: its
    rows (torch.chunk's ceil(rows/ranks)) of an entry split by rows — the moments (m×r on the right
    side, r×n on the left) and P (m×r) — all of Q; 8-bit block scales of the moments: one per 256 of
    its own elements; Q whole, or split by its r rows with ``shard_basis``."""
    m, n = SHAPES[name]
    side = projection_side((m, n), "std")
    if key == "basis_right" and not shard_basis:
        return alone
    whole_rows, width = (m, rank) if side == "right" and key != "basis_right" or key == "basis_left" else (rank, n)
    rows = -(-whole_rows // ranks)
    if key.endswith("absmax"):
        return 4 * math.ceil(rows * width / BLOCK)
    return alone * rows // whole_rows


def assert_state_split_by_rows(sharded_facts, alone_facts, ranks, rank, shard_basis=False):
    assert sharded_facts["galore"].keys() == alone_facts["galore"].keys()
    for name, entries in alone_facts["galore"].items():
        assert sharded_facts["galore"][name].keys() == entries.keys(), name
        for key, alone in entries.items():
            expected = expected_bytes_on_rank_0(name, key, alone, ranks, rank, shard_basis)
            held = sharded_facts["galore"][name][key]
            assert held == expected, (name, key, held, alone)


# entry of tests/fsdp2_script.py (rank 8, refresh every 3 steps) -> largest weight difference allowed
ONE_PROCESS = {
    "galore": 1e-5,  # svd
    "galore_randomized": 1e-5,
    "galore_random": 1e-5,
    # Fira: on 3 ranks below, and resumed from a full checkpoint
    # 8-bit: every rank's 32 rows × rank 8 are one block of 256, the one process's blocks; but a moment
    # on a code boundary rounds to the neighbouring code when float rounding moves it (fp32: 1e-7)
    "galore_8bit": 1e-3,
}


@pytest.mark.parametrize("entry", list(ONE_PROCESS))
def test_two_ranks_end_where_one_process_ends_holding_half_the_split_state(tmp_path, entry):
    options = dict(steps=12)  # refreshes at steps 0, 3, 6 and 9
    sharded = sharded_run(tmp_path, entry, options)
    step, state, facts = one_process(tmp_path, entry, options)
    assert sharded["world_size"] == 2 and sharded["step"] == step == 12
    assert_close_states(sharded["state"], state, atol=ONE_PROCESS[entry])
    assert sharded["facts"]["with_state"] == facts["with_state"]
    assert_state_split_by_rows(sharded["facts"], facts, ranks=2, rank=8)
    # moments on either side are row-split: each rank holds half of them
    for name in ("net.2", "net.4"):  # right, left
        held = sharded["facts"]["galore"][name]
        moments = [key for key in held if key.startswith("exp_avg")]
        assert moments and all(2 * held[key] == facts["galore"][name][key] for key in moments), name


def test_three_ranks_with_uneven_and_empty_shards_end_where_one_process_ends(tmp_path):
    """64, 32 and 4 rows over 3 ranks: 22/22/20, 11/11/10 and 2/2/0 (the head, on the left side:
    rank 2 holds none of its rows, and still takes part in every collective); Fira's norms too; and
    ``shard_basis``: each rank holds one of Q's 3 rows and gathers the rest for each step."""
    options = dict(steps=12, ranks=3)
    sharded = sharded_run(tmp_path, "galore_every_linear", options)
    step, state, facts = one_process(tmp_path, "galore_every_linear", options)
    assert sharded["world_size"] == 3 and sharded["step"] == step
    assert_close_states(sharded["state"], state)
    assert set(facts["galore"]) == set(SHAPES)
    assert_state_split_by_rows(sharded["facts"], facts, ranks=3, rank=3, shard_basis=True)


@pytest.mark.parametrize("entry, checkpoint", [("galore_8bit", "distributed"), ("galore_fira_shard_basis", "full")])
def test_resumes_exactly_from_a_checkpoint_taken_after_refreshes(tmp_path, entry, checkpoint):
    """Checkpointed at step 8 (bases from step 6, the next refresh at 9), resumed, the run ends bit
    for bit where the straight run ends. A distributed checkpoint holds the row-split state as
    DTensor shards (one file per rank); a full one (``save_distributed_checkpoint=False``) the
    whole matrices' state, as one process's, and both load with ``weights_only=True``."""
    checkpoints = tmp_path / "checkpoints"
    full = checkpoint == "full"
    options = dict(steps=12, full_checkpoint=full)
    straight = sharded_run(tmp_path, entry, dict(options, save_every=8, checkpoints=str(checkpoints)))
    saved = sorted(checkpoints.glob("*step=8*"))
    assert len(saved) == 1 and saved[0].is_dir() != full, list(checkpoints.iterdir())
    if full:
        optimizer = torch.load(saved[0], weights_only=True)["optimizer_states"][0]
        by_shape = {tuple(value.shape) for values in optimizer["state"].values() for value in values.values()
                    if isinstance(value, torch.Tensor)}
        assert {(64, 8), (8, 64), (32, 8)} <= by_shape  # net.0's moments, net.4's moments and basis: whole
    else:
        torch.load(saved[0] / "meta.pt", weights_only=True)
        assert len(list(saved[0].glob("*.distcp"))) == 2
    resumed = sharded_run(tmp_path, entry, dict(options, resume=str(saved[0])), folder="resumed")
    assert resumed["step"] == straight["step"] == 12
    assert_close_states(resumed["state"], straight["state"], atol=0.0)
    assert resumed["facts"] == straight["facts"]


@pytest.mark.parametrize("rows_per_rank, aligned", [(32, True), (22, False)])
def test_sharded_8bit_moments_equal_one_process_where_blocks_align(rows_per_rank, aligned):
    """Each rank quantizes its rows of an m×r moment in blocks of 256 from its first row: the same
    blocks as one process's when rows_per_rank·r is a multiple of 256, others where it is not."""
    pytest.importorskip("bitsandbytes")
    moment = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    codes, absmax = quantize_8bit(moment, signed=True)
    parts = [quantize_8bit(rows, signed=True) for rows in moment.split(rows_per_rank)]
    same_codes = torch.equal(codes, torch.cat([c for c, _ in parts]))
    assert (same_codes and torch.equal(absmax, torch.cat([a for _, a in parts]))) == aligned
