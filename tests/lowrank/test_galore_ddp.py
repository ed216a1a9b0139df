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


ONE_PROCESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_galore_one_process_script.py")


@pytest.mark.parametrize("options", [dict(projection="svd"), dict(projection="randomized_svd"),
                                     dict(projection="svd", fira=True), dict(projection="svd", eight_bit=True)],
                         ids=["svd", "randomized_svd", "fira", "8-bit"])
def test_two_ranks_end_where_one_process_ends_across_refreshes(tmp_path, options):
    """The all-reduced gradient differs from one process's by float rounding only; at a refresh that
    may flip basis vectors' signs, which carried moments must not notice (moments_on_refresh)."""
    import json

    import torch

    from tests.lowrank.ddp_galore_one_process_script import fit

    ranks = run_ddp_script(ONE_PROCESS, [json.dumps(options)], tmp_path)
    alone = fit(options, 1, str(tmp_path))
    for key, value in alone.state_dict().items():
        gap = (torch.tensor(ranks[key]) - value).abs().max().item()
        assert gap < 1e-4, (key, gap)
