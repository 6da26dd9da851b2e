"""Shared choices for the Triton kernels: accumulation dtype, dot precision, tile sizes."""

from __future__ import annotations

import torch
import triton.language as tl

# Products that feed eigenbasis projections must be full fp32 (SPEC §6), never plain TF32.
DOT_PRECISION = "ieee"


def compute_dtype(dtype: torch.dtype):
    """Accumulation dtype: float64 for float64 data, float32 for everything narrower."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile(size: int, largest: int = 64) -> int:
    """A power-of-two tile edge ≥ 16 (the smallest ``tl.dot`` accepts) that does not overshoot ``size`` much."""
    edge = 16
    while edge < size and edge < largest:
        edge *= 2
    return edge
