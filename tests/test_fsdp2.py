"""FSDP2 (``ModelParallelStrategy``, ``fully_shard``, 2 CPU ranks over gloo): each technique that
supports it ends where one process ends on the same global batches, within float tolerance — which
also guards against gloo summing where FSDP2's reduce-scatter should average (pytorch#162338); with
data-dependent epochs (InfoBatch pads a pruned epoch to a multiple of the ranks), where DDP ends.
The techniques without FSDP2 support are refused in ``setup`` (``test_reliability_matrix.py``)."""

import json
import os

import pytest
import torch

from tests.ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_script.py")

# entry of tests/techniques.py -> (options, compared with): "one" process, or "ddp" on 2 ranks
FSDP2 = {
    "loss_reweighting": (dict(steps=12), "one"),
    "infobatch": (dict(epochs=6), "ddp"),
    # plain FreezeOut: in the FSDP2 mix of tests/test_fsdp2_matrix.py
    "freezeout_lr_annealing": (dict(steps=12), "one"),
    "freezeout_cached": (dict(epochs=5), "one"),
    "adaptive": (dict(steps=12), "one"),
    "progressive_linear": (dict(steps=12), "one"),
    "freezeout_stem": (dict(steps=12), "one"),
}


def two_ranks(tmp_path, entry, strategy, options):
    folder = tmp_path / strategy
    folder.mkdir()
    return run_ddp_script(SCRIPT, [entry, strategy, json.dumps(options)], folder, ranks=options.get("ranks", 2))


def assert_close_states(a, b, atol=1e-5):  # atol 0: bit for bit
    assert a.keys() == b.keys()
    for key in a:
        gap = (torch.tensor(a[key]) - torch.tensor(b[key])).abs().max().item()
        assert gap <= atol, (key, gap)


@pytest.mark.parametrize("entry", list(FSDP2))
def test_fsdp2_ends_where_one_process_or_ddp_ends(tmp_path, entry):
    from tests.fsdp2_script import facts, fit, full_state

    options, reference = FSDP2[entry]
    sharded = two_ranks(tmp_path, entry, "fsdp2", options)
    assert sharded["world_size"] == 2
    if reference == "one":
        trainer, model = fit(entry, "one", options, str(tmp_path))
        expected, expected_facts = full_state(model), facts(trainer)
        assert sharded["step"] == trainer.global_step
    else:
        ddp = two_ranks(tmp_path, entry, "ddp", options)
        expected, expected_facts = ddp["state"], ddp["facts"]
        assert sharded["step"] == ddp["step"]
    assert_close_states(sharded["state"], expected)
    freed = sharded["facts"].pop("freed_state_bytes", None), expected_facts.pop("freed_state_bytes", None)
    assert sharded["facts"] == expected_facts  # e.g. frozen blocks hold no optimizer state on either
    if "frozen" in expected_facts:
        assert expected_facts["frozen"] > 0
        # every dim 0 of the MLP is even: each rank frees half of the AdamW state one process frees
        assert freed[0] > 0 and freed[0] * (2 if reference == "one" else 1) == freed[1], freed
    if "served" in expected_facts:
        assert expected_facts["served"] > 0


# the freezing entries have blocks frozen at step 8, whose parameters left the optimizer (asserted below)
# the freezing entries share the restore (the frozen set is applied before the optimizer loads): the
# adaptive schedule (its own state), the cache (it refills) here, FreezeOut with LR annealing from a full
# checkpoint below; the linear schedule's state is FreezeOut's kind (times only)
RESUMED = {"loss_reweighting": dict(steps=12), "infobatch": dict(epochs=6), "adaptive": dict(steps=12),
           "freezeout_cached": dict(epochs=5)}


def resumes_exactly(tmp_path, entry, options):
    """Run ``entry`` on 2 FSDP2 ranks with a checkpoint at step 8, resume a second run from it, and
    check that it ends bit for bit where the straight run ends; returns the checkpoint."""
    checkpoints = tmp_path / "checkpoints"
    straight = two_ranks(tmp_path, entry, "fsdp2", dict(options, save_every=8, checkpoints=str(checkpoints)))
    saved = sorted(checkpoints.glob("*step=8*"))
    assert len(saved) == 1, list(checkpoints.iterdir())
    if "frozen" in straight["facts"]:  # blocks frozen when the checkpoint was taken: the optimizer lost them
        meta = torch.load(saved[0] / "meta.pt" if saved[0].is_dir() else saved[0], weights_only=True)
        assert meta["callbacks"]["ProgressiveFreezing"]["frozen"] > 0
    (tmp_path / "resumed").mkdir()
    resumed = run_ddp_script(SCRIPT, [entry, "fsdp2", json.dumps(dict(options, resume=str(saved[0])))],
                             tmp_path / "resumed")
    assert resumed["step"] == straight["step"] > 8
    assert_close_states(resumed["state"], straight["state"], atol=0.0)
    assert resumed["facts"] == straight["facts"]
    return saved[0]


@pytest.mark.parametrize("entry", list(RESUMED))
def test_fsdp2_resumes_exactly_from_a_sharded_checkpoint(tmp_path, entry):
    """A run checkpointed by ModelParallelStrategy (a distributed checkpoint: one shard file per rank
    plus the callbacks' state) at step 8 and resumed ends bit for bit where the straight run ends."""
    assert resumes_exactly(tmp_path, entry, RESUMED[entry]).is_dir()  # sharded: a folder


@pytest.mark.parametrize("entry", ["freezeout_lr_annealing"])
def test_fsdp2_resumes_exactly_from_a_full_checkpoint(tmp_path, entry):
    """So does one checkpointed whole (``save_distributed_checkpoint=False``: one file, gathered)."""
    assert resumes_exactly(tmp_path, entry, dict(steps=12, full_checkpoint=True)).is_file()
