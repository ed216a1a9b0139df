"""Freezing under DDP (2 CPU processes, gloo): no "unused parameters" crash, the same frozen set on
every rank, and parameters that stay identical across ranks."""

import os

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_freezing_script.py")


def test_frozen_sets_and_parameters_identical_on_every_rank(tmp_path):
    result = run_ddp_script(SCRIPT, [], tmp_path)
    assert result["world_size"] == 2 and result["find_unused"] is True
    assert result["frozen"] == [3, 3]
    assert result["params_equal"]
