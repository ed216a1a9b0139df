"""Low-rank gradient projection: GaLoreAdamW (optim.py), its projections (projector.py) and the GaLore callback."""
