"""lit_efficient: efficient-training callbacks (and a DDP strategy) for PyTorch Lightning."""

from lit_efficient.freezing import AutoFreeze, FreezeOut, LinearFreezing, ProgressiveFreezing
from lit_efficient.lowrank.callback import GaLore
from lit_efficient.lowrank.optim import GaLoreAdamW
from lit_efficient.reweighting.infobatch import InfoBatch
from lit_efficient.reweighting.loss_reweighting import LossReweighting
from lit_efficient.sparsity.dst import SET, RigL
from lit_efficient.sparsity.granet import GraNet
from lit_efficient.sparsity.nm import NMSparsity
from lit_efficient.sparsity.sparcl import SparCL
from lit_efficient.strategies import ExactCompressionDDPStrategy

__version__ = "0.1.0"

__all__ = ["AutoFreeze", "ExactCompressionDDPStrategy", "FreezeOut", "GaLore", "GaLoreAdamW", "GraNet", "InfoBatch",
           "LinearFreezing", "LossReweighting", "NMSparsity", "ProgressiveFreezing", "RigL", "SET", "SparCL"]
