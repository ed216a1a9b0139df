"""Sparse training under FSDP2 (``ModelParallelStrategy``, ``fully_shard`` on every Linear, CPU ranks
over gloo): each rank keeps the mask of its own rows, yet every mask update chooses exactly what one
process chooses from the whole layers (``lit_efficient.core.shards.largest``), so the masks are
identical and the weights equal within float tolerance — on 2 ranks, and on 3, where the MLP's
layers split unevenly (64 rows as 22, 22, 20; the head's 4 as 2, 2, 0)."""

import json

import pytest
import torch

from tests.ddp_runner import run_ddp_script
from tests.test_fsdp2 import SCRIPT, assert_close_states, two_ranks

MASK = "sparsity_mask"

# entry -> options; each updates its masks at steps 3, 6 and 9 at least (GraNet also prunes until step 14)
SPARSE = {
    "rigl": dict(steps=12),
    "set": dict(steps=12),
    "granet": dict(steps=15),
    "granet_momentum": dict(steps=15),  # and the dense-gradient momentum, sharded like the masks
}


def assert_same_run(sharded, trainer, model, atol=1e-5):
    from tests.fsdp2_script import facts, full_state

    expected, expected_facts = full_state(model), facts(trainer)
    assert sharded["step"] == trainer.global_step
    masks = [key for key in expected if key.endswith(MASK)]
    assert masks and all(sharded["state"][key] == expected[key] for key in masks)  # identical masks
    weights = {k: v for k, v in expected.items() if k not in masks}
    assert_close_states({k: sharded["state"][k] for k in weights}, weights, atol=atol)
    here, whole = sharded["facts"].pop("mask_entries_here"), expected_facts.pop("mask_entries_here")
    assert sharded["facts"] == expected_facts  # updates made, whole-layer counts
    assert expected_facts["updates"] >= 3
    assert here < whole  # rank 0 holds its rows of each mask only
    return here, whole


@pytest.mark.parametrize("entry", list(SPARSE))
def test_fsdp2_masks_equal_one_process(tmp_path, entry):
    from tests.fsdp2_script import fit

    options = SPARSE[entry]
    sharded = two_ranks(tmp_path, entry, "fsdp2", options)
    trainer, model = fit(entry, "one", options, str(tmp_path))
    here, whole = assert_same_run(sharded, trainer, model)
    assert here * 2 == whole  # every targeted layer has an even number of rows


@pytest.mark.parametrize("entry", ["rigl"])  # GraNet's choices go through the same merge (core.shards.largest)
def test_fsdp2_uneven_shards_on_three_ranks(tmp_path, entry):
    from tests.fsdp2_script import fit

    options = dict(SPARSE[entry], ranks=3)
    sharded = two_ranks(tmp_path, entry, "fsdp2", options)
    assert sharded["world_size"] == 3
    trainer, model = fit(entry, "one", options, str(tmp_path))
    assert_same_run(sharded, trainer, model)


@pytest.mark.parametrize("entry", ["granet", "granet_momentum"])  # RigL's: saved by the same SparseMasks
def test_fsdp2_sparse_resumes_exactly_from_a_sharded_checkpoint(tmp_path, entry):
    """Checkpointed at step 8 (between mask updates, masks and GraNet's pruning under way) as a
    distributed checkpoint, resumed: bit for bit the straight run."""
    checkpoints = tmp_path / "checkpoints"
    options = dict(SPARSE[entry], save_every=8, checkpoints=str(checkpoints))
    straight = two_ranks(tmp_path, entry, "fsdp2", options)
    saved = sorted(checkpoints.glob("*step=8*"))
    assert len(saved) == 1 and saved[0].is_dir()
    (tmp_path / "resumed").mkdir()
    resumed = run_ddp_script(SCRIPT, [entry, "fsdp2", json.dumps(dict(SPARSE[entry], resume=str(saved[0])))],
                             tmp_path / "resumed")
    assert resumed["step"] == straight["step"] > 8
    masks = [key for key in straight["state"] if key.endswith(MASK)]
    assert all(resumed["state"][key] == straight["state"][key] for key in masks)
    assert_close_states({k: v for k, v in resumed["state"].items() if k not in masks},
                        {k: v for k, v in straight["state"].items() if k not in masks}, atol=0.0)
    assert resumed["facts"] == straight["facts"]
    assert torch.tensor(straight["facts"]["nonzeros"]).sum() < torch.tensor(straight["facts"]["sizes"]).sum()


@pytest.mark.parametrize("ranks", [2, 3])
def test_fsdp2_nm_sparsity_ends_where_one_process_ends(tmp_path, ranks):
    """N:M groups run along dim 1, inside each rank's rows: shard-local, no mask state."""
    from tests.fsdp2_script import fit, full_state

    options = dict(steps=12, ranks=ranks)
    sharded = two_ranks(tmp_path, "nm", "fsdp2", options)
    trainer, model = fit("nm", "one", options, str(tmp_path))
    expected = full_state(model)
    assert_close_states(sharded["state"], expected)
    weight = torch.tensor(sharded["state"]["net.2.weight"])  # finalized: 2 of every 4 inputs kept
    assert ((weight.reshape(-1, 4) != 0).sum(1) <= 2).all()
