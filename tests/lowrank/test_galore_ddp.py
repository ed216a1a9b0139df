"""GaLore under DDP (2 CPU processes, gloo): gradients are averaged before the optimizer step, so
every rank computes the same bases (SVD) or regenerates the same ones (random), and weights and
moments stay identical."""

import os

import pytest

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_galore_script.py")


@pytest.mark.parametrize("projection", ["svd", "random"])
def test_bases_and_weights_identical_on_every_rank(tmp_path, projection):
    result = run_ddp_script(SCRIPT, [projection], tmp_path)
    assert result["world_size"] == 2 and result["projected"] == 3
    assert result["bases"] == (3 if projection == "svd" else 0)  # random bases are regenerated, never stored
    assert result["state_equal"] and result["weights_equal"], result
