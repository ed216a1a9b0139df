"""With 2 DDP CPU processes, each holding half of the batch, LossReweighting's gradient equals the
single-process gradient of the reweighted loss on the concatenated batch (weights over the global
micro-batch, loss scaled so DDP's averaging gives a plain mean's scale)."""

import os

import pytest

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_reweighting_script.py")


@pytest.mark.parametrize("strategy", ["linupper", "extremes"])
def test_ddp_gradient_equals_the_single_process_gradient(tmp_path, strategy):
    result = run_ddp_script(SCRIPT, [strategy], tmp_path)
    assert result["world_size"] == 2
    assert result["max_diff"] < 1e-5, result
    assert result["differs_from_mean"] > 1e-3, result  # the weights really changed the gradient
