"""The registry behind the generic tests (timm's pattern): every callback, and the examples' main-job
combinations of them, as factories for the test-sized MLP of ``tests/sparsity/sparse_helpers.py``
(one-batch epochs of 16 samples, 20 epochs). Times are in optimizer steps so that a checkpoint at
step 7 falls mid-schedule."""

from lit_efficient import SET, AutoFreeze, FreezeOut, GaLore, GraNet, InfoBatch, LossReweighting, NMSparsity, RigL


def freezeout():
    return FreezeOut(t0=0.3, warp="linear")


TECHNIQUES = {
    "granet": lambda: [GraNet(sparsity=0.8, prune_end="14st", update_every="3st")],
    # regrowth from the dense gradients' momentum, a buffer beside each mask kept at every step
    "granet_momentum": lambda: [GraNet(sparsity=0.8, initial_density=0.5, prune_end="14st", update_every="3st",
                                       growth="momentum")],
    "rigl": lambda: [RigL(sparsity=0.8, update_every="3st", stop=0.9)],
    "set": lambda: [SET(sparsity=0.8, update_every="3st", stop=0.9)],
    "nm": lambda: [NMSparsity(n=2, m=4)],
    "freezeout": lambda: [freezeout()],
    "freezeout_lr_annealing": lambda: [FreezeOut(t0=0.3, warp="linear", lr_annealing=True)],
    "freezeout_cached": lambda: [FreezeOut(t0=0.3, warp="linear", cache_frozen_mb=8)],
    "adaptive": lambda: [AutoFreeze(freeze_start="2st", check_every="2st", percentile=90)],
    "galore": lambda: [GaLore(rank=8, update_proj_gap=3)],  # checkpoint at step 7: mid-gap, bases from step 6
    "galore_random_8bit": lambda: [GaLore(rank=8, update_proj_gap=3, projection="random", eight_bit=True)],
    "galore_rotate_8bit": lambda: [GaLore(rank=8, update_proj_gap=3, eight_bit=True, moments_on_refresh="rotate")],
    "infobatch": lambda: [InfoBatch(prune_ratio=0.5)],  # one-batch epochs that shrink when pruned
    "loss_reweighting": lambda: [LossReweighting(warmup="3st", temperature=0.5)],
}

# what examples/*/combined/*.yaml put together, scaled to the MLP
COMBINATIONS = {
    "vit_main_job": lambda: [RigL(sparsity=0.8, update_every="3st", stop=0.9), InfoBatch(prune_ratio=0.5), freezeout()],
    "lm_main_job": lambda: [GaLore(rank=8, update_proj_gap=3), InfoBatch(prune_ratio=0.5), freezeout()],
    "ddpm_main_job": lambda: [GraNet(sparsity=0.8, prune_end="14st", update_every="3st"), LossReweighting(warmup="3st"),
                              freezeout()],
}

ENTRIES = {**TECHNIQUES, **COMBINATIONS}
