"""The FSDP2 column of the reliability matrix, on a mix of techniques at once (RigL's masks,
FreezeOut's freezing and LossReweighting's per-sample weights, ``mix`` in ``tests/fsdp2_script.py``),
2 CPU ranks: equal to one process in fp32, also with gradient accumulation; under bf16-mixed bit
for bit what DDP computes (each rank runs the same half-batch in bf16 either way; one process runs
whole batches, whose bf16 rounding differs)."""

import pytest
import torch

from tests.test_fsdp2 import assert_close_states, two_ranks

MASK = "sparsity_mask"


def split(state):
    masks = {k: v for k, v in state.items() if k.endswith(MASK)}
    return masks, {k: v for k, v in state.items() if k not in masks}


@pytest.mark.parametrize("options", [dict(steps=12), dict(steps=12, accumulate=2, samples=128)],
                         ids=["fp32", "accumulate_2"])
def test_fsdp2_mix_ends_where_one_process_ends(tmp_path, options):
    from tests.fsdp2_script import facts, fit, full_state

    sharded = two_ranks(tmp_path, "mix", "fsdp2", options)
    trainer, model = fit("mix", "one", options, str(tmp_path))
    masks, weights = split(sharded["state"])
    expected_masks, expected_weights = split(full_state(model))
    assert masks == expected_masks
    assert_close_states(weights, expected_weights)
    expected = facts(trainer)
    assert sharded["step"] == trainer.global_step == 12
    for key in ("updates", "nonzeros", "frozen", "with_state"):
        assert sharded["facts"][key] == expected[key], key
    assert expected["frozen"] > 0 and expected["updates"] >= 3
    assert sharded["facts"]["freed_state_bytes"] * 2 == expected["freed_state_bytes"]


def test_fsdp2_mix_in_bf16_equals_ddp(tmp_path):
    options = dict(steps=12, precision="bf16-mixed")
    sharded = two_ranks(tmp_path, "mix", "fsdp2", options)
    ddp = two_ranks(tmp_path, "mix", "ddp", options)
    assert sharded["state"].keys() == ddp["state"].keys()
    masks, weights = split(sharded["state"])
    ddp_masks, ddp_weights = split(ddp["state"])
    assert masks == ddp_masks
    assert_close_states(weights, ddp_weights, atol=0.0)
    assert torch.tensor(sharded["facts"]["nonzeros"]).sum() < torch.tensor(sharded["facts"]["sizes"]).sum()
