"""One test over every technique (Composer's pattern): checkpoint mid-run, resume, and compare
with the uninterrupted run — weights, optimizer state and the callback's own state, bit for bit."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_efficient import SET, GaLore, GraNet, InfoBatch, LossReweighting, NMSparsity, ProgressiveFreezing, RigL
from tests.sparsity.sparse_helpers import MLP, loader

TECHNIQUES = {
    "granet": lambda: GraNet(sparsity=0.8, prune_end="14st", update_every="3st"),
    "rigl": lambda: RigL(sparsity=0.8, update_every="3st", stop=0.9),
    "set": lambda: SET(sparsity=0.8, update_every="3st", stop=0.9),
    "nm": lambda: NMSparsity(n=2, m=4),
    "freezeout": lambda: ProgressiveFreezing(schedule="freezeout", t0=0.3, warp="linear"),
    "galore": lambda: GaLore(rank=8, update_proj_gap=3),  # checkpoint at step 7: mid-gap, bases from step 6
    "galore_random_8bit": lambda: GaLore(rank=8, update_proj_gap=3, projection="random", eight_bit=True),
    "infobatch": lambda: InfoBatch(prune_ratio=0.5),  # one-batch epochs that shrink when pruned
    "loss_reweighting": lambda: LossReweighting(warmup="3st", temperature=0.5),
    "adaptive": lambda: ProgressiveFreezing(schedule="adaptive", freeze_start="2st", check_every="2st", percentile=90),
}


def run(tmp_path, name, ckpt=None):
    pl.seed_everything(0)
    model, callback = MLP(), TECHNIQUES[name]()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_epochs=7, save_top_k=-1, save_on_train_epoch_end=True)
    trainer = pl.Trainer(max_epochs=20, callbacks=[callback, saver], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, deterministic=True, default_root_dir=tmp_path)
    trainer.fit(model, loader(n=16, batch=16), ckpt_path=ckpt)  # one-batch epochs: the data order restores exactly
    return model, callback, trainer


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_resume_matches_the_uninterrupted_run(tmp_path, name):
    straight, straight_callback, straight_trainer = run(tmp_path, name)
    ckpt = tmp_path / "ckpts" / "epoch=6-step=7.ckpt"
    state = torch.load(ckpt, weights_only=True)
    resumed, resumed_callback, resumed_trainer = run(tmp_path, name, ckpt=str(ckpt))
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    a_opt, b_opt = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert [g["params"] for g in a_opt["param_groups"]] == [g["params"] for g in b_opt["param_groups"]]
    for index, values in a_opt["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b_opt["state"][index][key])), (index, key)
    a_state, b_state = straight_callback.state_dict(), resumed_callback.state_dict()
    key = next((k for k in state["callbacks"] if type(straight_callback).__name__ in k), None)
    assert a_state.keys() == b_state.keys() == (state["callbacks"][key].keys() if key else {}.keys())
    for k in a_state:
        if isinstance(a_state[k], torch.Tensor):
            assert torch.equal(a_state[k], b_state[k]), k
        else:
            assert a_state[k] == b_state[k], k


def test_the_infobatch_resume_case_really_prunes(tmp_path):
    _, straight, _ = run(tmp_path, "infobatch")
    assert straight.samples_forwarded - straight.order.numel() < 20 * 16  # it did prune
