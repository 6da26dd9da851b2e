"""Factor update: ``S = scale · xᵀx`` with both exponential-average epilogues, one pass (docs/algorithms.md §6.1).

Only tiles on or above the diagonal are computed; each writes itself and its mirror, so ``S``, ``X̄`` and
``X̂`` come out exactly symmetric and the GEMM work is halved. Offsets are formed in 64 bits: im2col inputs
reach 2³¹ elements (rows × n) and the factors of very wide layers do (n²).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kldwrm_fast.ops.triton_kernels.common import DOT_PRECISION, as_compute, compute_dtype, on_device_of, tile, warps

# Float64 tiles stop at 32: a 64×64 float64 tile spills on sm_90 and sm_80 with 4, 8 and 16 warps (measured with
# tools/triton_aot.py's compiler path; 32-wide tiles compile without spills).
LARGEST_TILE = {torch.float32: 64, torch.float64: 32}


@triton.jit
def _store_symmetric(ptr, values, rows, cols, n):
    tl.store(ptr + rows[:, None] * n + cols[None, :], values, mask=(rows[:, None] < n) & (cols[None, :] < n))
    tl.store(ptr + cols[:, None] * n + rows[None, :], tl.trans(values), mask=(cols[:, None] < n) & (rows[None, :] < n))


@triton.jit
def _factor_update_kernel(
    x_ptr, ea_ptr, local_ptr, hat_ptr,
    R, N, stride_xr, stride_xn,
    scale: tl.float64, rho: tl.float64, reweight: tl.float64,
    FIRST: tl.constexpr, WITH_HAT: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        rows = pid_i.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_j.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
        for r0 in range(0, R, BLOCK_R):
            sample = r0 + rr
            xi = tl.load(
                x_ptr + sample[:, None] * stride_xr + rows[None, :] * stride_xn,
                mask=(sample[:, None] < R) & (rows[None, :] < N), other=0.0,
            ).to(ACC)  # fmt: skip
            xj = tl.load(
                x_ptr + sample[:, None] * stride_xr + cols[None, :] * stride_xn,
                mask=(sample[:, None] < R) & (cols[None, :] < N), other=0.0,
            ).to(ACC)  # fmt: skip
            acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION, out_dtype=ACC)
        keep, hat_weight = as_compute(rho, ACC), as_compute(reweight, ACC)
        local = acc * as_compute(scale, ACC)
        if pid_i == pid_j:
            local = 0.5 * (local + tl.trans(local))
        if FIRST:
            old = local
        else:
            old = tl.load(
                ea_ptr + rows[:, None] * N + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < N), other=0.0
            ).to(ACC)
        out_ty = ea_ptr.dtype.element_ty
        _store_symmetric(local_ptr, local.to(out_ty), rows, cols, N)
        _store_symmetric(ea_ptr, (keep * old + (1 - keep) * local).to(out_ty), rows, cols, N)
        if WITH_HAT:
            _store_symmetric(hat_ptr, (keep * old + hat_weight * local).to(out_ty), rows, cols, N)


def factor_update(
    x: Tensor, ea: Tensor, reweighted: Tensor, scale: float, rho: float, reweight: float, first: bool,
    with_reweighted: bool,
) -> Tensor:  # fmt: skip
    """Triton implementation of :func:`kldwrm_fast.ops.reference.factor_update` (``ea`` must be contiguous)."""
    rows, n = x.shape
    local = torch.empty_like(ea)
    block_n, block_r = tile(n, largest=LARGEST_TILE.get(ea.dtype, 64)), tile(rows, largest=32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(n, block_n))
    with on_device_of(x):
        _factor_update_kernel[grid](
            x, ea, local, reweighted if with_reweighted else local,
            rows, n, x.stride(0), x.stride(1),
            scale, rho, reweight,
            FIRST=first, WITH_HAT=with_reweighted, PRECISION=DOT_PRECISION, ACC=compute_dtype(ea.dtype),
            BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps("factor_update", ea, block_n, block_r),
        )  # fmt: skip
    return local
