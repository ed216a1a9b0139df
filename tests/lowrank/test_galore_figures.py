"""What a researcher sees of GaLore in TensorBoard: the subspace overlap of every projected matrix
at each refresh after the first (and on no other step), the optimizer state against AdamW's at each
epoch's end, and ``state/AdamW`` in the progress bar."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from examples.nlp.lm import CausalLM
from figure_events import events_of, figure_steps, keep_figure
from lit_efficient import FreezeOut, GaLore
from tests.sparsity.sparse_helpers import MLP, loader


class Recorder(pl.Callback):
    """After GaLore's own hook: the per-matrix overlaps of each step that refreshed, and the
    progress bar at each epoch's end."""

    def __init__(self, galore):
        self.galore, self.refreshed, self.bars = galore, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        overlaps = self.galore.overlaps()
        if overlaps:
            self.refreshed[trainer.global_step] = overlaps

    def on_train_epoch_end(self, trainer, pl_module):
        self.bars.append(dict(trainer.progress_bar_metrics))


def fit(tmp_path, callbacks, model, data, steps, log_every_n_steps=4, with_logger=True):
    logger = TensorBoardLogger(tmp_path, name="tb") if with_logger else False
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, log_every_n_steps=log_every_n_steps,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(model, data)
    return trainer, (events_of(logger.log_dir) if with_logger else None)


@pytest.mark.parametrize("layerwise", [False, True])
def test_overlap_figure_at_each_refresh_after_the_first_and_state_at_each_epoch_end(tmp_path, layerwise):
    galore = GaLore(rank=4, update_proj_gap=5, layerwise=layerwise)
    recorder = Recorder(galore)
    trainer, events = fit(tmp_path, [galore, recorder], MLP(), loader(64, 16), 20)  # 4 steps an epoch
    # bases are computed at the matrices' steps 0, 5, 10, 15; the first has nothing to compare with
    refreshes = [6, 11, 16]
    assert sorted(recorder.refreshed) == refreshes  # and no other step reports an overlap
    assert all(list(overlaps) == ["net.0", "net.2", "net.4"] for overlaps in recorder.refreshed.values())
    assert all(0.0 <= v <= 1.0 + 1e-5 for overlaps in recorder.refreshed.values() for v in overlaps.values())
    assert figure_steps(events, "efficient/galore/subspace_overlap") == refreshes
    assert [step for step, *_ in galore.refresh_history] == refreshes
    for (step, mean, low, high) in galore.refresh_history:
        values = list(recorder.refreshed[step].values())
        assert mean == pytest.approx(sum(values) / 3) and low == min(values) and high == max(values)
    logged = [e.value for e in events.Scalars("efficient/galore/subspace_overlap")]
    assert logged == pytest.approx([mean for _, mean, _, _ in galore.refresh_history])
    assert figure_steps(events, "efficient/galore/optimizer_state") == [4, 8, 12, 16, 20]
    # sampled on logging steps (4, 8, ...) and at the end: the figure's line and the savings' peak agree
    assert [step for step, _, _ in galore.state_history] == [4, 8, 12, 16, 20]
    assert max(ours for _, ours, _ in galore.state_history) == galore.state_peak[0]
    if not layerwise:
        keep_figure(events, "efficient/galore/optimizer_state", "galore_optimizer_state_mlp")


def test_progress_bar_shows_the_state_against_adamw_and_can_be_switched_off(tmp_path):
    galore = GaLore(rank=4, update_proj_gap=5)
    recorder = Recorder(galore)
    trainer, _ = fit(tmp_path, [galore, recorder], MLP(), loader(64, 16), 8, log_every_n_steps=2, with_logger=False)
    ours, adamw = galore.state_history[-1][1:]
    assert trainer.progress_bar_metrics["state/AdamW"] == pytest.approx(round(ours / adamw, 3))
    assert 0 < trainer.progress_bar_metrics["state/AdamW"] < 1
    assert all("state/AdamW" in bar for bar in recorder.bars)
    trainer, _ = fit(tmp_path, [GaLore(rank=4, progress_bar=False)], MLP(), loader(64, 16), 4, log_every_n_steps=2,
                     with_logger=False)
    assert "state/AdamW" not in trainer.progress_bar_metrics
    with pytest.raises(ValueError, match="progress_bar"):
        GaLore(rank=4, progress_bar="yes")


def test_histories_come_back_from_a_checkpoint_and_older_ones_load_empty(tmp_path):
    galore = GaLore(rank=4, update_proj_gap=5)
    fit(tmp_path, [galore], MLP(), loader(64, 16), 12, with_logger=False)
    again = GaLore(rank=4, update_proj_gap=5)
    again.load_state_dict(galore.state_dict())
    assert again.state_history == galore.state_history and len(again.state_history) == 3
    assert again.refresh_history == galore.refresh_history and len(again.refresh_history) == 2
    state = galore.state_dict()
    del state["state_history"], state["refresh_history"]
    again.load_state_dict(state)
    assert again.state_history == [] and again.refresh_history == []
    assert again.state_peak == galore.state_peak


def tokens(n=32, length=16, vocab=64):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return DataLoader([{"input_ids": row} for row in ids], batch_size=8)


def test_a_language_models_matrices_are_named_and_freezing_shows_in_the_state(tmp_path):
    """A Llama-style LM under GaLore and FreezeOut: the overlap figure names the 14 projected
    matrices; the state falls as FreezeOut takes frozen blocks out of the optimizer."""
    torch.manual_seed(0)
    lm = CausalLM(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  max_position_embeddings=16, tie_word_embeddings=False, lr=3e-3, warmup_fraction=0.0)
    galore = GaLore(rank=8, update_proj_gap=6, scale=1.0)
    recorder = Recorder(galore)
    freezing = FreezeOut(t0=0.5, warp="linear", blocks=["model.layers.0", "model.layers.1"])
    trainer, events = fit(tmp_path, [galore, freezing, recorder], lm, tokens(), 40, log_every_n_steps=2)
    names = list(recorder.refreshed[min(recorder.refreshed)])
    assert len(names) == 14 and all(name.startswith("model.model.layers.") for name in names)
    steps = figure_steps(events, "efficient/galore/subspace_overlap")
    assert steps == sorted(recorder.refreshed) and len(steps) >= 2
    state = [ours for _, ours, _ in galore.state_history]
    assert state[-1] < 0.5 * max(state)  # both blocks frozen by the end: only embeddings, norms and head keep state
    assert figure_steps(events, "efficient/galore/optimizer_state") == [4 * e for e in range(1, 11)]
    keep_figure(events, "efficient/galore/subspace_overlap", "galore_subspace_overlap")
    keep_figure(events, "efficient/galore/optimizer_state", "galore_optimizer_state")
