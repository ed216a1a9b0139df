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


MID_EPOCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_mid_epoch_script.py")


def test_a_resume_from_the_middle_of_an_epoch_keeps_every_ranks_records(tmp_path):
    """Each rank holds the losses of its own share of the epoch until the epoch ends; a checkpoint
    inside the epoch (written by rank 0) must carry every rank's, and a resumed run end where the
    uninterrupted one ends."""
    import torch

    ckpts = tmp_path / "ckpts"
    (tmp_path / "straight").mkdir()
    straight = run_ddp_script(MID_EPOCH, [str(ckpts)], tmp_path / "straight")
    middle = None
    for path in sorted(ckpts.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1])):
        state = torch.load(path, weights_only=True)
        progress = state["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        if state["epoch"] >= 2 and not progress["is_last_batch"] and progress["current"]["ready"] >= 2:
            middle = path
            break
    assert middle is not None
    (tmp_path / "resumed").mkdir()
    resumed = run_ddp_script(MID_EPOCH, [str(ckpts), str(middle)], tmp_path / "resumed")
    assert resumed["step"] == straight["step"]
    assert resumed["seen"] == straight["seen"] and resumed["scores"] == straight["scores"]
    assert resumed["params"] == straight["params"]
