"""Progressive freezing: block discovery (:mod:`~lit_efficient.freezing.blocks`), when blocks
freeze (:mod:`~lit_efficient.freezing.schedules`), the freezer (:mod:`~lit_efficient.freezing.freezer`),
the frozen-output cache (:mod:`~lit_efficient.freezing.cache`), what every freezing callback shares
(:mod:`~lit_efficient.freezing.base`), the named callbacks (:mod:`~lit_efficient.freezing.freezeout`,
:mod:`~lit_efficient.freezing.autofreeze`, :mod:`~lit_efficient.freezing.linear`) and the umbrella
for configs (:mod:`~lit_efficient.freezing.progressive`)."""

from lit_efficient.freezing.autofreeze import AutoFreeze
from lit_efficient.freezing.freezeout import FreezeOut
from lit_efficient.freezing.linear import LinearFreezing
from lit_efficient.freezing.progressive import ProgressiveFreezing

__all__ = ["AutoFreeze", "FreezeOut", "LinearFreezing", "ProgressiveFreezing"]
