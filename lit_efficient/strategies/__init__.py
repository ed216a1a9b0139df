"""Lightning strategies: data parallelism shaped by what the techniques read.

* :mod:`~lit_efficient.strategies.exact_compression` — :class:`ExactCompressionDDPStrategy`
  (``strategy="ddp_exact_compression"``): DDP that all-reduces only GaLore's projected gradients
  and sparse layers' active entries, exactly.
"""

from lit_efficient.strategies.exact_compression import ExactCompressionDDPStrategy

__all__ = ["ExactCompressionDDPStrategy"]
