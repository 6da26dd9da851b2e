"""The operations object every caller holds, and the two decisions about what runs (docs/algorithms.md §5).

:class:`Operations` names one backend's implementation of each fused operation. Two questions are answered here
and nowhere else:

* :func:`~kldwrm_fast.ops.tracing.tracing`: whether ``torch.compile`` is tracing the code now. While it does, every
  operation is the PyTorch reference, whatever the backend (see :class:`Operations`), and code that keeps host-side
  caches (denominators, parameter views) takes its traceable form instead.
* :attr:`Operations.reference_now`: whether calls run the PyTorch reference eagerly, block by block: the
  ``"torch"`` backend outside a trace. Host-bound fast paths that produce the reference's results bit for bit
  are taken exactly then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from kldwrm_fast.ops.table import NAMES, OPERATIONS
from kldwrm_fast.ops.tracing import tracing

REFERENCE_FUNCTIONS: dict[str, Callable] = {operation.name: operation.reference for operation in OPERATIONS}
"""The PyTorch reference of every operation, by name: the ``"torch"`` backend, and every backend while
``torch.compile`` traces (see :class:`Operations`)."""


@dataclass(frozen=True)
class Operations:
    """The fused operations of one backend, by name (:data:`kldwrm_fast.ops.table.NAMES`; read as attributes,
    ``ops.precondition(...)``, with the signatures of :mod:`kldwrm_fast.ops.reference`), and its batched
    eigensolver (:data:`kldwrm_fast.curvature.eigen.BatchedSolver`; None: ``torch.linalg.eigh``).

    ``takes_unbatched``: the matrix operations also accept single blocks without a leading batch dimension
    (the PyTorch reference does; the kernels take a stacked batch).

    While ``torch.compile`` traces, every operation is the PyTorch reference, whatever the backend: the Triton and
    CUDA operations are custom ops, opaque to the compiler, which specialises their float arguments (a guard on
    each value), so a damping or a learning-rate-dependent coefficient that changes between steps would
    recompile the step every time; the compiler fuses the reference's code itself.
    """

    backend: str
    functions: Mapping[str, Callable] = field(repr=False)
    eigh: Optional[Callable] = None
    takes_unbatched: bool = False

    def __post_init__(self) -> None:
        missing = set(NAMES) - set(self.functions)
        if missing:
            raise ValueError(f"backend {self.backend!r} lacks the operations {sorted(missing)}")

    @property
    def reference_now(self) -> bool:
        """Whether calls run the PyTorch reference functions themselves, eagerly, on single blocks (the ``"torch"``
        backend outside a trace): then a host-side fast path that computes the reference's results bit for bit
        may replace the calls."""
        return self.takes_unbatched and self.functions is REFERENCE_FUNCTIONS and not tracing()

    def __getattr__(self, name: str) -> Callable:
        functions = REFERENCE_FUNCTIONS if tracing() else self.__dict__["functions"]
        try:
            return functions[name]
        except KeyError:
            raise AttributeError(name) from None
