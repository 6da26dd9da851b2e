"""The optimizers: thin step rules over the shared curvature machinery."""

from kldwrm_fast.optim.kfac import KFAC
from kldwrm_fast.optim.q import QKLDWRM
from kldwrm_fast.optim.qe import QEKLDWRM
from kldwrm_fast.optim.so import SOKLDWRM

__all__ = ["KFAC", "QEKLDWRM", "QKLDWRM", "SOKLDWRM"]
