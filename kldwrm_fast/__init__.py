"""kldwrm_fast: KLD-WRM natural-gradient optimizers (SO, Q) and their K-FAC baseline for PyTorch."""

from kldwrm_fast.optim import KFAC, QKLDWRM, SOKLDWRM

__version__ = "0.1.0"

__all__ = ["KFAC", "QKLDWRM", "SOKLDWRM", "__version__"]
