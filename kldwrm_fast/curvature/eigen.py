"""Symmetric eigendecomposition of Kronecker factors with the fallback ladder of SPEC §6.

Rungs, in order: the factor's own dtype; a float64 retry; float64 with ``ε·I`` added (ε relative to the
factor's scale); finally the previous decomposition is kept with a warning. Eigenvalues are clamped at 0
because factors are positive semi-definite in exact arithmetic and rounding can make small ones negative.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

JITTER = 1e-6


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` that also rejects non-finite results (the seam tests use to inject failures)."""
    values, vectors = torch.linalg.eigh(matrix)
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        raise torch.linalg.LinAlgError("eigendecomposition returned non-finite values")
    return values, vectors


def _attempts(matrix: Tensor):
    yield matrix
    wide = matrix.to(torch.float64)
    yield wide
    scale = wide.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    yield wide + (JITTER * scale)[..., None, None] * eye


def symmetric_eig(
    matrix: Tensor, previous: Optional[tuple[Tensor, Tensor]] = None, name: str = "factor"
) -> tuple[Tensor, Tensor]:
    """Eigenvectors and clamped eigenvalues of a symmetric (..., n, n) matrix.

    Returns:
        ``(Q, d)``: (..., n, n) eigenvectors and (..., n) eigenvalues ≥ 0, both in ``matrix.dtype``.

    Raises:
        torch.linalg.LinAlgError: every rung failed and there is no ``previous`` decomposition to keep.
    """
    for attempt in _attempts(matrix):
        if not torch.isfinite(attempt).all():
            break
        try:
            values, vectors = _eigh(attempt)
        except torch.linalg.LinAlgError:
            continue
        return vectors.to(matrix.dtype), values.to(matrix.dtype).clamp_min_(0.0)
    if previous is None:
        raise torch.linalg.LinAlgError(f"eigendecomposition of {name} failed and no earlier one exists")
    warnings.warn(f"eigendecomposition of {name} failed; keeping the previous one", RuntimeWarning, stacklevel=3)
    return previous


def decompose_many(requests: list[tuple[Tensor, Optional[tuple[Tensor, Tensor]], str]]) -> list[tuple[Tensor, Tensor]]:
    """:func:`symmetric_eig` for many factors, grouped by size, dtype and device into batched calls.

    Each group is one batched ``eigh`` with a host check of its input and of its results; only when that
    fails does each member of the group go down the fallback ladder on its own.

    Args:
        requests: ``(matrix, previous, name)`` per factor, as for :func:`symmetric_eig`.

    Returns:
        ``(Q, d)`` per request, in order (members of a batched group are views of one tensor).
    """
    results: list = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for index, (matrix, _, _) in enumerate(requests):
        groups.setdefault((matrix.shape[-1], matrix.dtype, matrix.device), []).append(index)
    for indices in groups.values():
        stacked = torch.stack([requests[i][0] for i in indices]) if len(indices) > 1 else None
        if stacked is not None and bool(torch.isfinite(stacked).all()):
            try:
                values, vectors = _eigh(stacked)
            except torch.linalg.LinAlgError:
                pass
            else:
                values.clamp_min_(0.0)
                for position, index in enumerate(indices):
                    results[index] = (vectors[position], values[position])
                continue
        for index in indices:
            results[index] = symmetric_eig(*requests[index])
    return results
