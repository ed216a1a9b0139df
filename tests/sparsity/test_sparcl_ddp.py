"""SparCL under DDP (2 CPU processes, gloo): masks, gradient masks, forgetting records and removed
samples identical on both ranks after several updates and removals, across a task boundary."""

import os

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_sparcl_script.py")


def test_masks_and_removed_samples_identical_across_ranks(tmp_path):
    result = run_ddp_script(SCRIPT, [], tmp_path)
    assert result["world_size"] == 2 and result["task"] == 1
    assert result["updates"] >= 4 and result["removed"] == round(0.3 * result["task_size"]), result
    assert abs(result["sparsity"] - 0.75) < 1e-3
    for key in ("masks_equal", "grad_masks_equal", "removed_equal", "events_equal", "weights_equal"):
        assert result[key], (key, result)
