"""Warm-started eigenbases (docs/algorithms.md §6.5): a factor's eigenbasis updated from the previous one by orthogonal
(subspace) iteration, with the eigenvalues its Rayleigh quotients and a residual that says whether to trust it.

Between two refreshes an averaged factor moves little, so the basis of its last decomposition is a good start:
``iters`` steps of ``Q ← qr(X Q)`` refine it, and ``d = diag(Qᵀ X Q)`` gives the eigenvalues. With ``Q`` orthogonal,
``X − Q diag(d) Qᵀ = (X Q − Q diag(d)) Qᵀ``, so the relative residual ``‖X Q − Q diag(d)‖_F / ‖X‖_F`` is exactly the
relative distance of ``X`` from the matrix whose exact decomposition the step then uses. A member whose residual
exceeds the tolerance takes the exact path (:func:`kldwrm_fast.curvature.eigen.decompose_many`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EIGENSOLVERS = ("exact", "warm")


@dataclass(frozen=True)
class WarmStart:
    """How a refresh updates the eigenbases: ``iters`` orthogonal-iteration steps from the previous basis (0: keep
    the basis, refresh its eigenvalues), accepted when the relative residual is at most ``tol``."""

    iters: int
    tol: float


def orthogonal_iteration(stack: Tensor, basis: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, vectors, residual)`` of symmetric (batch, n, n) factors from (batch, n, n) orthogonal bases whose
    columns are in ascending order of their eigenvalues (as :func:`torch.linalg.eigh` and this function return them).

    ``iters`` batched GEMM + QR pairs, then one GEMM for the Rayleigh quotients and the residual (no host sync).

    Returns:
        ``values`` (batch, n): ``diag(Qᵀ X Q)`` in ascending order (as ``torch.linalg.eigh``), not clamped;
        ``vectors`` (batch, n, n): ``Q``, its columns the eigenvectors in that order; ``residual`` (batch,):
        ``‖X Q − Q diag(values)‖_F / ‖X‖_F`` (0 for a zero factor).
    """
    # Largest eigenvalue first: QR's Gram–Schmidt order makes column j converge to the j-th largest eigenvector,
    # so a basis in eigh's ascending order would pull its first columns toward the dominant ones.
    vectors = basis.flip(-1)
    for _ in range(iters):
        vectors = torch.linalg.qr(torch.matmul(stack, vectors)).Q
    image = torch.matmul(stack, vectors)
    values = (vectors * image).sum(-2)
    misfit = torch.linalg.vector_norm(image - vectors * values.unsqueeze(-2), dim=(-2, -1))
    scale = torch.linalg.vector_norm(stack, dim=(-2, -1))
    residual = torch.where(scale > 0, misfit / scale.clamp_min(torch.finfo(stack.dtype).tiny), misfit)
    values, order = values.sort(-1)
    return values, vectors.gather(-1, order.unsqueeze(-2).expand_as(vectors)), residual
