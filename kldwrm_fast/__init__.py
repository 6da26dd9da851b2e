"""kldwrm_fast: KLD-WRM natural-gradient optimizers (SO, Q, QE) and their K-FAC baseline for PyTorch."""

from kldwrm_fast.checkpoint_file import load_checkpoint, save_checkpoint
from kldwrm_fast.optim import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

__version__ = "0.1.0"

__all__ = ["KFAC", "QEKLDWRM", "QKLDWRM", "SOKLDWRM", "__version__", "load_checkpoint", "save_checkpoint"]
