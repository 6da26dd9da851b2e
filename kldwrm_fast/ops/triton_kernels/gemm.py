"""Batched strided GEMM with the epilogues the preconditioner needs.

``C[b] = α · A[b] @ B[b]``, optionally divided element-wise by ``d_row[b, i] · d_col[b, j] + δ`` (the damped
eigenvalue products of docs/algorithms.md §1, fused into the middle product). Transposes are free: pass ``.mT`` views,
the kernel reads any strides. One launch covers every block of the batch.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kldwrm_fast.ops.triton_kernels.common import (
    DOT_PRECISION,
    MAX_GRID_YZ,
    as_compute,
    compute_dtype,
    on_device_of,
    tile,
    warps,
)


@triton.jit
def _bmm_kernel(
    a_ptr, b_ptr, c_ptr, d_row_ptr, d_col_ptr,
    M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bb, stride_bk, stride_bn,
    stride_cb, stride_cm, stride_cn,
    stride_rb, stride_cb_col,
    alpha: tl.float64, damping: tl.float64,
    DIVIDE: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K).to(tl.int64)
    a_base = a_ptr + batch * stride_ab
    b_base = b_ptr + batch * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + inner
        a = tl.load(
            a_base + rows[:, None] * stride_am + ks[None, :] * stride_ak,
            mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0,
        ).to(ACC)  # fmt: skip
        b = tl.load(
            b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0,
        ).to(ACC)  # fmt: skip
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    acc = acc * as_compute(alpha, ACC)
    if DIVIDE:
        d_row = tl.load(d_row_ptr + batch * stride_rb + rows, mask=rows < M, other=1.0).to(ACC)
        d_col = tl.load(d_col_ptr + batch * stride_cb_col + cols, mask=cols < N, other=1.0).to(ACC)
        acc = acc / (d_row[:, None] * d_col[None, :] + as_compute(damping, ACC))
    c_ptrs = c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def bmm(
    a: Tensor, b: Tensor, alpha: float = 1.0, divide: Optional[tuple[Tensor, Tensor]] = None, damping: float = 0.0
) -> Tensor:
    """``α · a @ b`` for (B, M, K) and (B, K, N) tensors (any strides), optionally ⊘ ``(d_row d_colᵀ + δ)``.

    Returns a new contiguous (B, M, N) tensor in ``a``'s dtype. ``divide`` holds (B, M) and (B, N) tensors.
    Batches beyond :data:`MAX_GRID_YZ` go in several launches.
    """
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.empty(batch, m, n, dtype=a.dtype, device=a.device)
    d_row, d_col = divide if divide is not None else (out, out)
    block_m, block_n, block_k = tile(m), tile(n), tile(k, largest=32)
    with on_device_of(a):
        for start in range(0, batch, MAX_GRID_YZ):  # the batch is grid axis 2
            part = slice(start, min(start + MAX_GRID_YZ, batch))
            a_, b_, out_, d_row_, d_col_ = (t[part] for t in (a, b, out, d_row, d_col))
            grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), a_.shape[0])
            _bmm_kernel[grid](
                a_, b_, out_, d_row_, d_col_, m, n, k,
                a_.stride(0), a_.stride(1), a_.stride(2),
                b_.stride(0), b_.stride(1), b_.stride(2),
                out_.stride(0), out_.stride(1), out_.stride(2),
                d_row_.stride(0), d_col_.stride(0),
                alpha, damping,
                DIVIDE=divide is not None, PRECISION=DOT_PRECISION, ACC=compute_dtype(a.dtype),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps("bmm", a, block_m, block_n, block_k),
            )  # fmt: skip
    return out
