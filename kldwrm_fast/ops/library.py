"""The fused operations as ``torch.library`` custom ops (namespace ``kldwrm_fast``).

Each operation of :data:`kldwrm_fast.ops.table.OPERATIONS` exists once per backend under the same schema:
``kldwrm_fast::<op>`` is the PyTorch reference (any device; the CPU path and the CUDA fallback),
``kldwrm_fast::<op>_triton`` the Triton kernels (:mod:`kldwrm_fast.ops.triton_kernels`), and
``kldwrm_fast::<op>_cuda`` the CUDA extension's (defined in C++, ``csrc/registration.cpp``; fakes added by
:mod:`kldwrm_fast.ops.cuda_ext`). Every op has a fake implementation so ``torch.compile`` can trace through
the optimizer step. :func:`register` defines one backend's ops from its implementation functions.
"""

from __future__ import annotations

from typing import Callable

import torch

from kldwrm_fast.ops.table import OPERATIONS


def register(suffix: str, implementations: dict[str, Callable]) -> dict[str, Callable]:
    """Define ``kldwrm_fast::<op><suffix>`` for every operation of the table; return the registered ops by name.

    ``implementations`` maps every operation name to a function with the reference's signature.
    """
    missing = {operation.name for operation in OPERATIONS} - set(implementations)
    if missing:
        raise ValueError(f"register({suffix!r}): no implementation for {sorted(missing)}")
    ops = {}
    for operation in OPERATIONS:
        op = torch.library.custom_op(
            operation.qualified_name(suffix),
            implementations[operation.name],
            mutates_args=operation.mutates,
            schema=operation.schema,
        )
        op.register_fake(operation.fake)
        ops[operation.name] = op
    return ops


REFERENCE_OPS = register("", {operation.name: operation.reference for operation in OPERATIONS})
