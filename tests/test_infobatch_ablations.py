"""benchmarks/infobatch.py's ablations: each changes one thing about InfoBatch's epoch plan."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.infobatch import InfoBatchNoRescaling, RandomPruning  # noqa: E402
from lit_efficient import InfoBatch  # noqa: E402


def planned(callback, scores):
    callback.prepare_dataset(scores.numel())
    callback.scores, callback.seen = scores.clone(), torch.ones(scores.numel(), dtype=torch.bool)
    callback.shuffle = True
    callback.prepare_epoch(epoch=3, max_epochs=40)
    return callback.order.sort().values, callback.multipliers


def test_ablations_keep_infobatch_count_and_change_one_thing():
    scores = torch.linspace(0.0, 1.0, 200) ** 4  # most samples below the mean: well learned
    order, multipliers = planned(InfoBatch(0.5, seed=1), scores)
    assert order.numel() < 200 and multipliers.max() > 1.0  # InfoBatch prunes and rescales

    same_order, ones = planned(InfoBatchNoRescaling(0.5, seed=1), scores)
    assert torch.equal(same_order, order) and torch.equal(ones, torch.ones(200))

    random_order, ones = planned(RandomPruning(0.5, seed=1), scores)
    assert random_order.numel() == order.numel() and torch.equal(ones, torch.ones(200))
    # drawn from the whole dataset: high-score samples (never pruned by InfoBatch) are skipped too
    assert not torch.equal(random_order, order) and (scores[random_order] > scores.mean()).sum() < (scores > scores.mean()).sum()
