"""Training data as techniques see it: the planned-order (resumable) training loader
(:mod:`~lit_efficient.data.planned_order`) and the per-sample loss contract
(:mod:`~lit_efficient.data.sample_losses`)."""
