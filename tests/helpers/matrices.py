"""Random symmetric positive definite matrices for the tests (one helper instead of one per file)."""

import torch


def spd(n, dtype=torch.float64, batch=(), device="cpu", generator=None):
    """A (*batch, n, n) SPD matrix ``R Rᵀ / n`` with ``R`` (n, n + 2) standard normal, built in float64 and made
    exactly symmetric before it is cast to ``dtype``."""
    root = torch.randn(*batch, n, n + 2, dtype=torch.float64, generator=generator)
    product = root @ root.mT / n
    return (0.5 * (product + product.mT)).to(device=device, dtype=dtype)
