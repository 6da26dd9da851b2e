"""Triton kernels for the fused operations, registered as ``kldwrm_fast::<op>_triton``.

Importing this module compiles nothing; kernels JIT-compile on first use (on CPU tensors they run under
``TRITON_INTERPRET=1``, which must be set before this import). The ops are ``torch.library.custom_op``s
with fake implementations rather than ``triton_op``s, so they stay opaque to tracing, which the CPU
interpreter cannot follow.
"""

from kldwrm_fast.ops.library import register
from kldwrm_fast.ops.triton_kernels.factor_update import factor_update
from kldwrm_fast.ops.triton_kernels.ghat import ghat_recursion
from kldwrm_fast.ops.triton_kernels.precondition import precondition, q_precondition

SUFFIX = "_triton"

TRITON_OPS = register(
    SUFFIX,
    {
        "factor_update": factor_update,
        "precondition": precondition,
        "q_precondition": q_precondition,
        "ghat_recursion": ghat_recursion,
    },
)
