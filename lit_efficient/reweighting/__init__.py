"""Techniques that read per-sample losses: LossReweighting and InfoBatch (see ``contract.py``)."""
