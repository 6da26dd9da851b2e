"""Factor update: ``S = scale · xᵀx`` with both exponential-average epilogues, one pass (docs/algorithms.md §6.1).

Only tiles on or above the diagonal are computed; each writes itself and its mirror, so ``S``, ``X̄`` and
``X̂`` come out exactly symmetric and the GEMM work is halved. Offsets are formed in 64 bits: im2col inputs
reach 2³¹ elements (rows × n) and the factors of very wide layers do (n²).

Parallel over rows: when the tiles alone would give the GPU few programs (a convolution's input factor has
batch × locations rows and a small n: 262,144 rows and n = 28 would be one program), the rows are split into
chunks (:func:`row_chunks`, a function of the shapes alone). Each (tile, chunk) program writes its partial Gram
tile into a workspace, and one program per tile then sums the chunks in a fixed order and applies the
epilogue. No atomics: the result does not depend on scheduling, so a resumed run stays bit-identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kldwrm_fast.ops.triton_kernels.common import DOT_PRECISION, as_compute, compute_dtype, on_device_of, tile, warps

ROWS_PER_CHUNK = 4096
"""Rows below which a factor update is not split (a chunk's rows are at least this many, rounded to the row tile)."""
TARGET_PROGRAMS = 1024
"""Chunks are added until tiles × chunks reach about this many programs (an H200 has 132 SMs; a few programs per
SM hide latency), and no further: each chunk costs a workspace tile."""

# Float64 tiles stop at 32: a 64×64 float64 tile spills on sm_90 and sm_80 with 4, 8 and 16 warps (measured with
# tools/triton_aot.py's compiler path; 32-wide tiles compile without spills).
LARGEST_TILE = {torch.float32: 64, torch.float64: 32}


@triton.jit
def _store_symmetric(ptr, values, rows, cols, n):
    tl.store(ptr + rows[:, None] * n + cols[None, :], values, mask=(rows[:, None] < n) & (cols[None, :] < n))
    tl.store(ptr + cols[:, None] * n + rows[None, :], tl.trans(values), mask=(cols[:, None] < n) & (rows[None, :] < n))


@triton.jit
def _tile_indices(pid, BLOCK_N: tl.constexpr):
    """The 64-bit row (or column) indices of tile ``pid``."""
    return pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _partial_gram(
    x_ptr, R, N, stride_xr, stride_xn, row_start, row_stop, rows, cols,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``x[row_start:row_stop, rows]ᵀ x[row_start:row_stop, cols]`` of one tile, accumulated in ``ACC``."""
    rr = tl.arange(0, BLOCK_R).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
    for r0 in range(row_start, row_stop, BLOCK_R):
        sample = r0 + rr
        inside = (sample < row_stop) & (sample < R)
        xi = tl.load(
            x_ptr + sample[:, None] * stride_xr + rows[None, :] * stride_xn,
            mask=inside[:, None] & (rows[None, :] < N), other=0.0,
        ).to(ACC)  # fmt: skip
        xj = tl.load(
            x_ptr + sample[:, None] * stride_xr + cols[None, :] * stride_xn,
            mask=inside[:, None] & (cols[None, :] < N), other=0.0,
        ).to(ACC)  # fmt: skip
        acc += tl.dot(tl.trans(xi), xj, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _epilogue(acc, ea_ptr, local_ptr, hat_ptr, rows, cols, N, diagonal, scale, rho, reweight,
              FIRST: tl.constexpr, WITH_HAT: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """``S = scale · acc`` of one tile on or above the diagonal, written with its mirror as ``S``, ``X̄`` and
    optionally ``X̂`` (docs/algorithms.md §6.1)."""
    keep, hat_weight = as_compute(rho, ACC), as_compute(reweight, ACC)
    local = acc * as_compute(scale, ACC)
    if diagonal:
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
        rows, cols = _tile_indices(pid_i, BLOCK_N), _tile_indices(pid_j, BLOCK_N)
        acc = _partial_gram(x_ptr, R, N, stride_xr, stride_xn, 0, R, rows, cols, PRECISION, ACC, BLOCK_N, BLOCK_R)
        _epilogue(acc, ea_ptr, local_ptr, hat_ptr, rows, cols, N, pid_i == pid_j, scale, rho, reweight,
                  FIRST, WITH_HAT, ACC)  # fmt: skip


@triton.jit
def _factor_partial_kernel(
    x_ptr, work_ptr, R, N, stride_xr, stride_xn, rows_per_chunk,
    PRECISION: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Stage 1 of the row-parallel update: chunk ``program_id(2)``'s partial Gram of one upper tile, into
    ``work[chunk]`` (chunks, N, N) in ``ACC``."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        chunk = tl.program_id(2).to(tl.int64)
        rows, cols = _tile_indices(pid_i, BLOCK_N), _tile_indices(pid_j, BLOCK_N)
        start = chunk * rows_per_chunk
        acc = _partial_gram(
            x_ptr, R, N, stride_xr, stride_xn, start, start + rows_per_chunk, rows, cols, PRECISION, ACC, BLOCK_N,
            BLOCK_R,
        )  # fmt: skip
        inside = (rows[:, None] < N) & (cols[None, :] < N)
        tl.store(work_ptr + chunk * N * N + rows[:, None] * N + cols[None, :], acc, mask=inside)


@triton.jit
def _factor_reduce_kernel(
    work_ptr, ea_ptr, local_ptr, hat_ptr, N, chunks,
    scale: tl.float64, rho: tl.float64, reweight: tl.float64,
    FIRST: tl.constexpr, WITH_HAT: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stage 2: the chunks of one upper tile summed in chunk order, then the epilogue."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_i <= pid_j:
        rows, cols = _tile_indices(pid_i, BLOCK_N), _tile_indices(pid_j, BLOCK_N)
        inside = (rows[:, None] < N) & (cols[None, :] < N)
        offsets = rows[:, None] * N + cols[None, :]
        plane = N.to(tl.int64) * N  # chunks × n² passes 2³¹ for wide layers
        acc = tl.zeros((BLOCK_N, BLOCK_N), dtype=ACC)
        for chunk in range(0, chunks):
            acc += tl.load(work_ptr + chunk * plane + offsets, mask=inside, other=0.0)
        _epilogue(acc, ea_ptr, local_ptr, hat_ptr, rows, cols, N, pid_i == pid_j, scale, rho, reweight,
                  FIRST, WITH_HAT, ACC)  # fmt: skip


def row_chunks(rows: int, n: int, block_n: int, block_r: int) -> tuple[int, int]:
    """``(chunks, rows per chunk)`` of a factor update over ``rows`` × ``n``: one chunk unless the upper tiles give
    fewer than :data:`TARGET_PROGRAMS` programs and the rows exceed :data:`ROWS_PER_CHUNK`; a function of the shapes
    only, so every run of a shape sums in the same order."""
    tiles = triton.cdiv(n, block_n)
    wanted = min(triton.cdiv(rows, ROWS_PER_CHUNK), max(1, TARGET_PROGRAMS // (tiles * (tiles + 1) // 2)))
    if wanted <= 1:
        return 1, rows
    per_chunk = block_r * triton.cdiv(triton.cdiv(rows, wanted), block_r)
    return triton.cdiv(rows, per_chunk), per_chunk


def factor_update(
    x: Tensor, ea: Tensor, reweighted: Tensor, scale: float, rho: float, reweight: float, first: bool,
    with_reweighted: bool,
) -> Tensor:  # fmt: skip
    """Triton implementation of :func:`kldwrm_fast.ops.reference.factor_update` (``ea`` must be contiguous)."""
    rows, n = x.shape
    local = torch.empty_like(ea)
    block_n, block_r = tile(n, largest=LARGEST_TILE.get(ea.dtype, 64)), tile(rows, largest=32)
    grid = (triton.cdiv(n, block_n), triton.cdiv(n, block_n))
    hat = reweighted if with_reweighted else local
    acc = compute_dtype(ea.dtype)
    chunks, per_chunk = row_chunks(rows, n, block_n, block_r)
    with on_device_of(x):
        if chunks == 1:
            _factor_update_kernel[grid](
                x, ea, local, hat,
                rows, n, x.stride(0), x.stride(1),
                scale, rho, reweight,
                FIRST=first, WITH_HAT=with_reweighted, PRECISION=DOT_PRECISION, ACC=acc,
                BLOCK_N=block_n, BLOCK_R=block_r, num_warps=warps("factor_update", ea, block_n, block_r),
            )  # fmt: skip
            return local
        work_dtype = torch.float64 if ea.dtype == torch.float64 else torch.float32
        work = torch.empty((chunks, n, n), dtype=work_dtype, device=x.device)
        _factor_partial_kernel[(*grid, chunks)](
            x, work, rows, n, x.stride(0), x.stride(1), per_chunk,
            PRECISION=DOT_PRECISION, ACC=acc, BLOCK_N=block_n, BLOCK_R=block_r,
            num_warps=warps("factor_partial", ea, block_n, block_r),
        )  # fmt: skip
        _factor_reduce_kernel[grid](
            work, ea, local, hat, n, chunks,
            scale, rho, reweight,
            FIRST=first, WITH_HAT=with_reweighted, ACC=acc, BLOCK_N=block_n,
            num_warps=warps("factor_reduce", ea, block_n),
        )  # fmt: skip
    return local
