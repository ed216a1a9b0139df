"""SparCL under FSDP2 (2 CPU ranks, gloo, every conv/linear layer sharded on dim 0): each rank keeps
its rows of the weight and gradient masks, yet the masks, gradient masks, forgetting records and
removed samples are exactly DDP's, across a task boundary; a checkpoint taken inside the second task
(a distributed checkpoint; the gradient masks saved whole) resumes bit for bit."""

import json
import os

import torch

from ddp_runner import run_ddp_script

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_sparcl_script.py")


def run(tmp_path, name, strategy, options):
    folder = tmp_path / name
    folder.mkdir()
    return run_ddp_script(SCRIPT, [strategy, json.dumps(options)], folder)


def masks_and_weights(state):
    masks = {k: v for k, v in state.items() if k.endswith("sparsity_mask")}
    return masks, {k: torch.tensor(v) for k, v in state.items() if k not in masks and k != "_extra_state"}


def test_sparcl_under_fsdp2_equals_ddp(tmp_path):
    sharded, ddp = run(tmp_path, "fsdp2", "fsdp2", {}), run(tmp_path, "ddp", "ddp", {})
    assert sharded["task"] == ddp["task"] == 1 and sharded["updates"] == ddp["updates"] >= 4
    for key in ("grad_masks", "removed", "events", "step"):
        assert sharded[key] == ddp[key], key
    masks, weights = masks_and_weights(sharded["state"])
    ddp_masks, ddp_weights = masks_and_weights(ddp["state"])
    assert masks == ddp_masks and len(masks) == 3
    for key, value in ddp_weights.items():
        if value.is_floating_point():
            assert (weights[key] - value).abs().max() <= 1e-5, key
    assert abs(sharded["sparsity"] - 0.75) < 1e-3 and sum(sharded["removed"]) > 0


def test_sparcl_resumes_exactly_from_a_sharded_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    straight = run(tmp_path, "straight", "fsdp2", dict(save_every=23, checkpoints=str(checkpoints), method="none"))
    saved = sorted(checkpoints.glob("*step=23*"))
    assert len(saved) == 1 and saved[0].is_dir()
    resumed = run(tmp_path, "resumed", "fsdp2", dict(resume=str(saved[0]), method="none"))
    assert resumed["step"] == straight["step"] > 23
    for key in ("grad_masks", "removed", "events", "updates", "state"):
        assert resumed[key] == straight[key], key
