"""lit_efficient: efficient-training callbacks for PyTorch Lightning."""

__version__ = "0.1.0"

__all__: list[str] = []
