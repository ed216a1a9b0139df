"""What a researcher sees of sparse training: the per-layer figures and histogram at each mask
update (and on no other step), and the sparsity in the progress bar."""

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from sparse_helpers import MLP, loader, trainer

from figure_events import events_of, figure_steps, histogram_steps, keep_figure
from lit_efficient import SET, GraNet, RigL
from lit_efficient.sparsity.masked import MaskedTraining

FIGURES = ("layer_density", "mask_changes", "masks")


def run(tmp_path, callback, steps=12, monkeypatch=None):
    drawn = []
    if monkeypatch is not None:
        original = MaskedTraining.draw_layers

        def recording(self, trainer_, densities, pruned, grown):
            drawn.append((trainer_.global_step, list(densities), list(pruned), list(grown)))
            return original(self, trainer_, densities, pruned, grown)

        monkeypatch.setattr(MaskedTraining, "draw_layers", recording)
    logger = TensorBoardLogger(tmp_path, name="tb")
    t = trainer(tmp_path, [callback], steps, logger=logger, log_every_n_steps=2)
    t.fit(MLP(), loader(n=64, batch=8))
    return t, events_of(logger.log_dir), drawn


@pytest.mark.parametrize("kind", [RigL, SET])
def test_figures_on_mask_updates_only(tmp_path, monkeypatch, kind):
    callback = kind(sparsity=0.8, update_every="4st", stop=1.0)
    t, events, drawn = run(tmp_path, callback, monkeypatch=monkeypatch)
    updates = [4, 8]  # stop=1.0: the window of updates closes before step 12
    assert [s for s, *_ in drawn] == updates
    for name in FIGURES:
        assert figure_steps(events, f"efficient/{kind.technique}/{name}") == updates
    assert histogram_steps(events, f"efficient/{kind.technique}/weight_magnitude") == updates
    # constant density: every layer regrows what it dropped, and something changed
    for _, _, pruned, grown in drawn:
        assert pruned == grown and sum(grown) > 0
    assert t.progress_bar_metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    if kind is RigL:
        for name in FIGURES:
            keep_figure(events, f"efficient/rigl/{name}", f"rigl_{name}")


def test_granet_changes_count_pruning_and_regrowth(tmp_path, monkeypatch):
    callback = GraNet(sparsity=0.8, update_every="3st", prune_start=0.0, prune_end=0.75)
    t, events, drawn = run(tmp_path, callback, monkeypatch=monkeypatch)
    steps = [s for s, *_ in drawn]
    assert steps and figure_steps(events, "efficient/granet/layer_density") == steps
    # densities fall as GraNet prunes: what each update removed net is pruned - grown
    previous = [1.0] * len(drawn[0][1])
    sizes = [p.numel() for p in callback.masks.params]
    for _, densities, pruned, grown in drawn:
        for before, after, p, g, size in zip(previous, densities, pruned, grown, sizes):
            assert round(before * size) - p + g == round(after * size)
        previous = densities
    assert sum(sum(p) for *_, p, _ in drawn) > sum(sum(g) for *_, g in drawn)
    assert t.progress_bar_metrics["sparsity"] == pytest.approx(0.8, abs=0.01)
    keep_figure(events, "efficient/granet/mask_changes", "granet_mask_changes", index=1)


def test_target_densities_are_the_distribution_at_the_final_sparsity(tmp_path):
    callback = RigL(sparsity=0.9, update_every="4st", distribution="erk")
    t = trainer(tmp_path, [callback], 1)
    t.fit(MLP(), loader())
    name, target = callback.target_densities()
    assert name == "ERK target"
    assert target == pytest.approx(callback.masks.layer_densities(), abs=1e-6)  # RigL starts at its target
    sizes = callback.masks.sizes()
    assert sum(d * s for d, s in zip(target, sizes)) / sum(sizes) == pytest.approx(0.1, abs=1e-3)


def test_no_progress_entry_when_switched_off(tmp_path):
    t = trainer(tmp_path, [RigL(sparsity=0.8, update_every="4st", progress_bar=False)], 6)
    t.fit(MLP(), loader())
    assert "sparsity" not in t.progress_bar_metrics


def test_progress_bar_argument_is_checked():
    with pytest.raises((TypeError, ValueError), match="progress_bar"):
        RigL(progress_bar="yes")


def test_thumbnail_layers_spread_over_the_network():
    callback = RigL()

    class Masks:
        targets = list(range(10))

    callback.masks = Masks()
    assert callback.thumbnail_layers() == [0, 3, 6, 9]
    Masks.targets = [0, 1]
    assert callback.thumbnail_layers() == [0, 1]
