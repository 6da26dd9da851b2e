"""Eigen-preconditioning ``P_{X,Y}(V)`` and the Q products ``(S, M)`` from four/six batched GEMMs."""

from __future__ import annotations

from torch import Tensor

from kldwrm_fast.ops.triton_kernels.gemm import bmm


def _batched(*tensors: Tensor) -> tuple[bool, list[Tensor]]:
    """Add a batch dimension to unbatched inputs (the last one is the block-form matrix); report which."""
    if tensors[-1].dim() == 3:
        return True, list(tensors)
    return False, [t.unsqueeze(0) for t in tensors]


def _projected(q_out, d_out, q_in, d_in, v, damping):
    """``Q_Y [(Q_Yᵀ V Q_X) ⊘ (d_Y d_Xᵀ + δ)]`` — everything of P but the last product with ``Q_Xᵀ``."""
    rotated = bmm(q_out.mT, v)
    scaled = bmm(rotated, q_in, divide=(d_out, d_in), damping=damping)
    return bmm(q_out, scaled)


def precondition(q_out: Tensor, d_out: Tensor, q_in: Tensor, d_in: Tensor, v: Tensor, damping: float) -> Tensor:
    """Triton implementation of :func:`kldwrm_fast.ops.reference.precondition` (same shapes and dtypes)."""
    batched, (q_out, d_out, q_in, d_in, v) = _batched(q_out, d_out, q_in, d_in, v)
    result = bmm(_projected(q_out, d_out, q_in, d_in, v, damping), q_in.mT)
    return result if batched else result[0]


def q_precondition(
    q_out: Tensor, d_out: Tensor, q_in: Tensor, d_in: Tensor, g_hat: Tensor, damping: float, lr: float,
    ea_out: Tensor, ea_in: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Triton implementation of :func:`kldwrm_fast.ops.reference.q_precondition`."""
    batched, (q_out, d_out, q_in, d_in, ea_out, ea_in, g_hat) = _batched(q_out, d_out, q_in, d_in, ea_out, ea_in, g_hat)
    step = bmm(_projected(q_out, d_out, q_in, d_in, g_hat, damping), q_in.mT, alpha=-lr)
    product = bmm(bmm(ea_out, step), ea_in, alpha=-1.0 / lr)
    return (step, product) if batched else (step[0], product[0])
