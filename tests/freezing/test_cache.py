"""Serving frozen blocks' outputs from memory (``cache_frozen_mb``): the same training as without
the cache, on every architecture it can serve, and nothing served where inputs do not repeat."""

import functools
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_efficient import ProgressiveFreezing
from lit_efficient.freezing.cache import row_keys
from tests.freezing.test_progressive import LMModule, UNetModule, ViTModule, image_loader, make_trainer


def shuffled(dataset, batch=8):
    return DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(3))


def images(n=32):
    return image_loader(n=n).dataset


def tokens(n=32):
    return TensorDataset(torch.randint(0, 32, (n, 8), generator=torch.Generator().manual_seed(0)))


class ResNetModule(ViTModule):
    def __init__(self):
        pl.LightningModule.__init__(self)
        from timm.models.resnet import BasicBlock, ResNet

        torch.manual_seed(0)
        self.model = ResNet(BasicBlock, [2, 1, 1, 1], num_classes=4, in_chans=1)
        self.kind = "sgd"


class GPT2(LMModule):
    """GPT-2 without dropout on the embeddings (which would change the frozen blocks' input every step,
    as would its tied embedding if it kept training through the head: frozen here)."""

    def __init__(self, embedding_dropout=0.0):
        super().__init__("gpt2")
        self.model.transformer.drop.p = embedding_dropout


class PaddedLM(GPT2):
    """GPT-2 with a padding mask: its blocks take a per-row input besides the hidden states."""

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        mask = (torch.arange(ids.shape[1]) < 4 + ids[:, :1] % 4).long()
        return self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


class NoisyViT(ViTModule):
    """Augmentation: inputs never repeat, so nothing can be served."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x + 0.01 * torch.randn_like(x)), y)


TIED_FROZEN = {"tied_embeddings": "freeze"}
CASES = {  # module, data, freezing arguments
    "vit": (ViTModule, images, {}),
    "resnet": (ResNetModule, images, {}),
    "gpt2": (GPT2, tokens, TIED_FROZEN),
    "llama": (lambda: LMModule("llama"), tokens, {}),
    "gpt2_padded": (PaddedLM, tokens, TIED_FROZEN),
    "vit_augmented": (NoisyViT, images, {}),
    "gpt2_embedding_dropout": (lambda: GPT2(embedding_dropout=0.1), tokens, TIED_FROZEN),
    "gpt2_tied_embedding_training": (GPT2, tokens, {}),
}


def train(tmp_path, case, cache_mb, steps=40):
    make_module, dataset, kwargs = CASES[case]
    pl.seed_everything(0)
    module = make_module()
    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.2, warp="linear", cache_frozen_mb=cache_mb, **kwargs)
    served = []

    class Record(pl.Callback):  # the cache is gone after fit: read it at the end of training
        def on_train_end(self, trainer, pl_module):
            cache = freezing._cache
            if cache is not None:
                served.append((cache.served, cache.served_in_part, cache.forwards, cache.nbytes, cache.disabled))

    make_trainer(tmp_path, [freezing, Record()], steps).fit(module, shuffled(dataset()))
    return module, freezing, (served or [None])[0]


@pytest.mark.parametrize("case", ["vit", "resnet", "gpt2", "llama", "gpt2_padded"])
def test_cached_training_equals_uncached_and_serves_the_repeated_inputs(tmp_path, case):
    plain, plain_freezing, _ = train(tmp_path, case, 0)
    cached, freezing, (whole, in_part, forwards, nbytes, disabled) = train(tmp_path, case, 64)
    assert freezing.frozen == plain_freezing.frozen == len(freezing.blocks)
    for (name, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert disabled is None and 0 < nbytes <= 64 * 2**20
    # 4 batches an epoch, shuffled: after a freezing change, batches mixing seen and unseen rows
    # are served in part (except with a padding mask, which keeps rows with their batch)
    assert whole > 0 and forwards > whole
    assert (in_part == 0) if case == "gpt2_padded" else (in_part > 0)


@pytest.mark.parametrize("case", ["vit_augmented", "gpt2_embedding_dropout", "gpt2_tied_embedding_training"])
def test_inputs_that_never_repeat_are_never_served_and_the_cache_lets_go(tmp_path, case):
    plain, _, _ = train(tmp_path, case, 0)
    with pytest.warns(UserWarning, match="no input to the frozen blocks came back in two epochs"):
        cached, _, (whole, in_part, forwards, nbytes, disabled) = train(tmp_path, case, 64)
    assert whole == in_part == 0 and forwards > 0
    assert disabled is not None and nbytes == 0  # freed after the last prefix's two epochs without a hit
    for a, b in zip(plain.parameters(), cached.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_the_memory_budget_is_kept(tmp_path):
    row = 17 * 32 * 4  # the ViT's tokens x width, float32
    budget = 10 * row / 2**20  # 10 of the 32 rows
    plain, _, _ = train(tmp_path, "vit", 0)
    cached, _, (whole, in_part, _, nbytes, _) = train(tmp_path, "vit", budget)
    assert 0 < nbytes <= 10 * row and in_part > 0
    for a, b in zip(plain.parameters(), cached.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_validation_is_served_too_and_scores_the_same(tmp_path):
    def run(cache_mb):
        pl.seed_everything(0)
        module = ViTModule(drop_rate=0.0)
        scores = []
        module.validation_step = lambda batch, batch_idx: scores.append(module.model(batch[0]).sum())
        freezing = ProgressiveFreezing(schedule="linear", freeze_start=0.0, freeze_level=0.5, cache_frozen_mb=cache_mb)
        served = []  # batches served whole during each validation run

        class Count(pl.Callback):
            def on_validation_start(self, trainer, pl_module):
                self.before = freezing._cache.served if freezing._cache else 0

            def on_validation_end(self, trainer, pl_module):
                served.append((freezing._cache.served if freezing._cache else 0) - self.before)

        trainer = make_trainer(tmp_path, [freezing, Count()], 32, val_check_interval=4, num_sanity_val_steps=0)
        trainer.fit(module, shuffled(images()), DataLoader(TensorDataset(images(8).tensors[0]), batch_size=4))
        return torch.stack(scores), served

    plain, _ = run(0)
    cached, served = run(64)
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    # both validation batches come from the cache when the frozen prefix is unchanged since the last run
    assert max(served) == 2 and served.count(2) >= 2


def test_a_unet_is_not_served_and_says_why(tmp_path):
    class FixedInputUNet(UNetModule):  # repeated inputs: only the UNet's structure stops the cache
        def training_step(self, batch, batch_idx):
            x, _ = batch
            return nn.functional.mse_loss(self.unet(x, torch.zeros(x.shape[0], dtype=torch.long)).sample, x)

    freezing = ProgressiveFreezing(schedule="freezeout", t0=0.2, warp="linear", cache_frozen_mb=64)
    with pytest.warns(UserWarning, match="not cached"):  # down blocks take keywords, return skip connections
        make_trainer(tmp_path, [freezing], 16).fit(FixedInputUNet(), image_loader())
    assert freezing.frozen == 2  # trained on, uncached


@pytest.mark.parametrize("on_device", [False, True])  # blake2b on the host / the hash an accelerator runs
def test_row_keys_follow_content_and_shared_arguments(on_device):
    keys_of = functools.partial(row_keys, on_device=on_device)
    x = torch.arange(12.0).reshape(3, 4)
    keys = keys_of((x,), {})
    assert len(set(keys)) == 3
    assert keys_of((x[[2, 0]],), {}) == [keys[2], keys[0]]  # a row's key does not depend on its batch
    shared = torch.ones(1, 4)
    assert keys_of((x,), {"pos": shared}) != keys
    assert keys_of((x,), {"pos": shared}) == keys_of((x,), {"pos": shared.clone()})
    assert keys_of((x,), {"pos": shared}) != keys_of((x,), {"pos": shared * 2})
    assert keys_of((x.bfloat16(),), {}) != keys
    assert keys_of((x[:0],), {}) == []


@pytest.mark.parametrize("on_device", [False, True])
def test_row_keys_tell_apart_rows_that_differ_in_one_bit(on_device):
    keys_of = functools.partial(row_keys, on_device=on_device)
    torch.manual_seed(0)
    rows = torch.randn(4, 10_000)  # longer than one chunk of words
    flipped = rows.clone()
    flipped.view(torch.int32)[1, 9_999] ^= 1  # the last bit of the last element of row 1
    a, b = keys_of((rows,), {}), keys_of((flipped,), {})
    assert a[0] == b[0] and a[1] != b[1]
    positive, negative = rows.clone(), rows.clone()
    positive[3, 5], negative[3, 5] = 0.0, -0.0  # equal as numbers, different bytes
    assert keys_of((positive,), {})[3] != keys_of((negative,), {})[3]
    odd = torch.randint(0, 255, (5, 7), dtype=torch.uint8)[:, 1:]  # an odd offset and a view
    assert len(set(keys_of((odd,), {}))) == len({tuple(r) for r in odd.tolist()})
    mask = torch.tensor([[True, False], [False, True], [True, False]])
    keys = keys_of((mask,), {})
    assert keys[0] == keys[2] != keys[1]


@pytest.mark.parametrize("bad", [-1.0, math.nan, "64", True])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="cache_frozen_mb"):
        ProgressiveFreezing(cache_frozen_mb=bad)


def test_cache_needs_frozen_blocks_in_eval_mode():
    with pytest.raises(ValueError, match="cache_frozen_mb.*frozen_eval"):
        ProgressiveFreezing(cache_frozen_mb=64, frozen_eval=False)


def test_a_compiled_module_is_refused(tmp_path):
    freezing = ProgressiveFreezing(cache_frozen_mb=64)
    with pytest.raises(ValueError, match="cache_frozen_mb.*compile"):
        make_trainer(tmp_path, [freezing], 2).fit(torch.compile(ViTModule()), image_loader())
