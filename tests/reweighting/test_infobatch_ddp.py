"""InfoBatch under DDP (2 CPU processes, gloo): every rank holds the same scores and plans, and the
ranks split each epoch's order between them (the odd-sized dataset exercises the padding)."""

import os

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_infobatch_script.py")


def test_scores_and_plans_identical_and_epochs_split_across_ranks(tmp_path):
    result = run_ddp_script(SCRIPT, [], tmp_path)
    assert result["world_size"] == 2
    assert result["pruned_epochs"] >= 3, result
    for key in ("scores_equal", "seen_equal", "multipliers_equal", "order_equal", "plans_equal", "split_ok",
                "params_equal"):
        assert result[key], (key, result)
