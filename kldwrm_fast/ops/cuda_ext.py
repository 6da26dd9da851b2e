"""The CUDA extension's operations ``kldwrm_fast::<op>_cuda`` and its cuSOLVER eigensolver.

Importing this module imports ``kldwrm_fast._C`` (built from ``csrc/`` by ``setup.py``), whose static
initialisers define and register the ops for CUDA tensors, and adds their fake implementations. It raises
``ImportError`` when the extension was not built or cannot be loaded; :mod:`kldwrm_fast.ops.backends` turns
that into the reason the ``"cuda"`` backend is unavailable, so ``import kldwrm_fast`` never depends on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

import kldwrm_fast._C  # noqa: F401  (registers the operations)
from kldwrm_fast.ops.table import OPERATIONS

SUFFIX = "_cuda"

for _operation in OPERATIONS:
    torch.library.register_fake(_operation.qualified_name(SUFFIX))(_operation.fake)


@torch.library.register_fake("kldwrm_fast::eigh_cuda")
def _eigh_fake(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    strides = column_major_strides(matrix.shape)
    vectors = torch.empty_strided(matrix.shape, strides, dtype=matrix.dtype, device=matrix.device)
    return matrix.new_empty(matrix.shape[:-1]), vectors, matrix.new_empty(matrix.shape[:-2], dtype=torch.int32)


def column_major_strides(shape: torch.Size) -> tuple[int, ...]:
    """Strides of a dense (..., n, n) tensor stored column-major per matrix (torch.linalg.eigh's eigenvectors)."""
    n = shape[-1]
    strides, step = [1, n], n * n
    for size in reversed(shape[:-2]):
        strides.insert(0, step)
        step *= size
    return tuple(strides)


CUDA_OPS = {operation.name: getattr(torch.ops.kldwrm_fast, operation.name + SUFFIX) for operation in OPERATIONS}
"""The fused operations by name (signatures of :mod:`kldwrm_fast.ops.reference`)."""


def eigh(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """cuSOLVER eigendecomposition of a (..., n, n) symmetric float32/float64 CUDA tensor, no host sync.

    Returns:
        ``(values, vectors, info)``: ascending eigenvalues (..., n); eigenvectors as columns (..., n, n) in the
        layout ``torch.linalg.eigh`` uses (column-major per matrix, :func:`column_major_strides`; a tensor of
        its own, not a view); cuSOLVER's info (...) int32 on the device, 0 where the matrix converged. Batches
        go through ``cusolverDnXsyevBatched`` in chunks within its documented limit (n²·batch ≤ 2³¹−1), single
        matrices and larger sizes through ``cusolverDnXsyevd``.
    """
    return torch.ops.kldwrm_fast.eigh_cuda(matrix)
