"""Freezing under DDP (2 CPU processes, gloo): no "unused parameters" crash, the same frozen set on
every rank, and parameters that stay identical across ranks — with frozen outputs served from each
rank's own cache too, to the same weights."""

import os

import torch

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_freezing_script.py")


def test_frozen_sets_and_parameters_identical_on_every_rank(tmp_path):
    result = run_ddp_script(SCRIPT, [], tmp_path)
    assert result["world_size"] == 2 and result["find_unused"] is True
    assert result["frozen"] == [3, 3]
    assert result["params_equal"]
    plain = torch.load(tmp_path / "result.json.pt")
    (tmp_path / "cached").mkdir()
    cached = run_ddp_script(SCRIPT, ["16"], tmp_path / "cached")
    assert cached["frozen"] == [3, 3] and cached["params_equal"]
    assert all(s > 0 for s in cached["served"])  # every rank served its own rows
    for name, value in torch.load(tmp_path / "cached" / "result.json.pt").items():
        torch.testing.assert_close(value, plain[name], rtol=1e-5, atol=1e-6, msg=name)
