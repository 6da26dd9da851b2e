"""Whether ``torch.compile`` is tracing the calling code: the one place the library asks (docs/algorithms.md §5).

While a trace runs, every fused operation is the PyTorch reference whatever the backend
(:class:`~kldwrm_fast.ops.operations.Operations`), multi-tensor operations whose float arguments the compiler would
specialise become one operation per tensor, and host-side caches (denominators, parameter views) are bypassed.
"""

import torch


def tracing() -> bool:
    """Whether ``torch.compile`` is tracing the calling code now."""
    return torch.compiler.is_compiling()
