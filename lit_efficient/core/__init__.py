"""What every technique stands on; no technique is known here.

* :mod:`~lit_efficient.core.callback` — :class:`EfficientCallback`, the base of every callback
  (life-cycle, composition check, run clock, savings rows).
* :mod:`~lit_efficient.core.composition` — what a callback owns alone; combinations refused.
* :mod:`~lit_efficient.core.clock` — the run clock every schedule reads.
* :mod:`~lit_efficient.core.protocols` — the named hooks between techniques.
* :mod:`~lit_efficient.core.gradient_travel` — what of a gradient a step reads (a projection, kept
  entries), packed and written back by the exact-compression DDP strategy.
* :mod:`~lit_efficient.core.time` — time specs, run lengths and ramps.
* :mod:`~lit_efficient.core.checks` — argument checks.
* :mod:`~lit_efficient.core.targets` — which modules and weights a technique touches.
* :mod:`~lit_efficient.core.distributed` — supported strategies, collectives shared by techniques.
* :mod:`~lit_efficient.core.tasks` — the continual-learning task protocol.
* :mod:`~lit_efficient.core.logs`, :mod:`~lit_efficient.core.savings` — scalars, images,
  throughput; the savings table.
* :mod:`~lit_efficient.core.device`, :mod:`~lit_efficient.core.seeding` — host/device helpers;
  random draws equal on every rank.
* :mod:`~lit_efficient.core.lightning_internals` — the one place that touches Lightning's private
  attributes.
"""
