"""The Ĝ recursion (S103): ``Ĝ ← V_new + coef·(Ĝ − V_prev − M)``, ``V_prev ← V_new``, element-wise.

One launch per tensor: the CPU interpreter cannot follow a table of pointers, so the multi-tensor
single launch belongs to the CUDA extension.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kldwrm_fast.ops.triton_kernels.common import as_compute, compute_dtype, on_device_of

BLOCK = 1024


@triton.jit
def _ghat_kernel(new_ptr, g_hat_ptr, prev_ptr, m_ptr, n, coef: tl.float64, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    new = tl.load(new_ptr + offsets, mask=mask, other=0.0)
    g_hat = tl.load(g_hat_ptr + offsets, mask=mask, other=0.0).to(ACC)
    prev = tl.load(prev_ptr + offsets, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + offsets, mask=mask, other=0.0).to(ACC)
    result = new.to(ACC) + as_compute(coef, ACC) * (g_hat - prev - m)
    tl.store(g_hat_ptr + offsets, result.to(g_hat_ptr.dtype.element_ty), mask=mask)
    tl.store(prev_ptr + offsets, new, mask=mask)


def ghat_recursion(
    v_new: list[Tensor], g_hat: list[Tensor], v_prev: list[Tensor], m: list[Tensor], coef: float
) -> None:
    """Triton implementation of :func:`kldwrm_fast.ops.reference.ghat_recursion` (contiguous tensors)."""
    for new, gh, prev, mk in zip(v_new, g_hat, v_prev, m, strict=True):
        n = gh.numel()
        with on_device_of(gh):
            _ghat_kernel[(triton.cdiv(n, BLOCK),)](
                new.contiguous(), gh, prev, mk.contiguous(), n, coef, ACC=compute_dtype(gh.dtype), BLOCK=BLOCK
            )
