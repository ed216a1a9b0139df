"""benchmarks/infobatch.py's helpers: the ablations each change one thing about InfoBatch's epoch plan;
Fashion-MNIST is read from its IDX files."""

import gzip
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.infobatch import FashionMNISTFiles, InfoBatchNoRescaling, RandomPruning, read_idx  # noqa: E402
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
    assert not torch.equal(random_order, order)
    assert (scores[random_order] > scores.mean()).sum() < (scores > scores.mean()).sum()


def write_idx(path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.numpy().tobytes())


def test_fashion_mnist_is_read_from_idx_files_gzipped_or_not(tmp_path):
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2])
    assert torch.equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)

    data = FashionMNISTFiles(str(tmp_path), train_subset=4)
    data.setup()
    x, y = data.train_set.tensors
    assert x.shape == (4, 1, 28, 28) and len(set(y.tolist())) == 4  # a subset of distinct images
    for image, label in zip(x, y):  # each kept image still carries its own label
        assert torch.equal((image[0] * 255).round().to(torch.uint8), images[int(label)])
    assert torch.equal(data.val_set.tensors[1], labels[:2].long())
