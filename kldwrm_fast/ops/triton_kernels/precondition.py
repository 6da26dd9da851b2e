"""Eigen-preconditioning ``P_{A,Γ}(V)`` and the Q products ``(S, M)`` from four/six batched GEMMs."""

from __future__ import annotations

from torch import Tensor

from kldwrm_fast.ops.triton_kernels.gemm import bmm


def _batched(*tensors: Tensor) -> tuple[bool, list[Tensor]]:
    """Add a batch dimension to unbatched inputs (the last one is the block-form matrix); report which."""
    if tensors[-1].dim() == 3:
        return True, list(tensors)
    return False, [t.unsqueeze(0) for t in tensors]


def _projected(q_g, d_g, q_a, d_a, v, damping):
    """``Q_Γ [(Q_Γᵀ V Q_A) ⊘ (d_Γ d_Aᵀ + δ)]`` — everything of P but the last product with ``Q_Aᵀ``."""
    rotated = bmm(q_g.mT, v)
    scaled = bmm(rotated, q_a, divide=(d_g, d_a), damping=damping)
    return bmm(q_g, scaled)


def precondition(q_g: Tensor, d_g: Tensor, q_a: Tensor, d_a: Tensor, v: Tensor, damping: float) -> Tensor:
    """Triton implementation of :func:`kldwrm_fast.ops.reference.precondition` (same shapes and dtypes)."""
    batched, (q_g, d_g, q_a, d_a, v) = _batched(q_g, d_g, q_a, d_a, v)
    result = bmm(_projected(q_g, d_g, q_a, d_a, v, damping), q_a.mT)
    return result if batched else result[0]


def q_precondition(
    q_g: Tensor, d_g: Tensor, q_a: Tensor, d_a: Tensor, g_hat: Tensor, damping: float, lr: float,
    ea_g: Tensor, ea_a: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Triton implementation of :func:`kldwrm_fast.ops.reference.q_precondition`."""
    batched, (q_g, d_g, q_a, d_a, ea_g, ea_a, g_hat) = _batched(q_g, d_g, q_a, d_a, ea_g, ea_a, g_hat)
    step = bmm(_projected(q_g, d_g, q_a, d_a, g_hat, damping), q_a.mT, alpha=-lr)
    product = bmm(bmm(ea_g, step), ea_a, alpha=-1.0 / lr)
    return (step, product) if batched else (step[0], product[0])
