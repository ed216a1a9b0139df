"""The examples' main-job combinations under DDP (2 CPU processes, gloo): after training, weights,
mask buffers, optimizer state (GaLore's projected moments and bases too) and every callback's
tensor state (InfoBatch's scores, ...) are identical on both ranks, and the frozen set is the same."""

import os

import pytest

from ddp_runner import run_ddp_script
from tests.techniques import COMBINATIONS

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_combined_script.py")


@pytest.mark.parametrize("name", sorted(COMBINATIONS))
def test_every_state_identical_on_every_rank(tmp_path, name):
    result = run_ddp_script(SCRIPT, [name], tmp_path)
    assert result["world_size"] == 2 and result["global_step"] >= 16
    assert result["differing"] == [], result["differing"]
    assert any(result["frozen"]) and not all(result["frozen"])  # freezing happened, the head still trains
