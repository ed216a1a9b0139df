"""Masks are identical on every DDP rank (2 CPU processes, gloo), although each rank sees
different data: growth reads gradients after DDP averaged them, and random choices use one seed."""

import os

import pytest

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_sparse_script.py")


@pytest.mark.parametrize("name,density", [("granet", 0.2), ("rigl", 0.2), ("set", 0.2), ("nm", 0.25)])
def test_masks_identical_on_every_rank(tmp_path, name, density):
    result = run_ddp_script(SCRIPT, [name], tmp_path)
    assert result["world_size"] == 2 and (name == "nm" or result["updates"] >= 4)
    assert result["masks_equal"] and result["weights_equal"], result
    assert result["density"] == pytest.approx(density, abs=1e-3)
