"""The one place where a backend for the fused operations is chosen (docs/algorithms.md §5).

``backend="auto"`` takes the environment override ``KLDWRM_BACKEND`` when set; otherwise, on CUDA tensors,
each call goes to the implementation the dispatch table names for its operation and size class among those
that can run (:mod:`kldwrm_fast.ops.routing`; the eigensolver, and the backend the optimizer reports,
are those of the first of CUDA extension and Triton that can run), and on CPU tensors to PyTorch. It never
fails where ``"torch"`` works.
An explicit backend forces its implementation for every call; one that cannot run raises ``RuntimeError``
saying why.

Imports run one way, each layer from those before it: :mod:`~kldwrm_fast.ops.table` (the operations and their
references) → :mod:`~kldwrm_fast.ops.operations` → :mod:`~kldwrm_fast.ops.backends` →
:mod:`~kldwrm_fast.ops.routing` → this module.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from kldwrm_fast.ops.backends import BACKENDS, IMPLEMENTATIONS, operations, runnable_auto_order, unavailable_reason
from kldwrm_fast.ops.operations import Operations
from kldwrm_fast.ops.routing import current_table, routed_operations

__all__ = [
    "BACKENDS", "ENV_OVERRIDE", "IMPLEMENTATIONS", "Operations", "operations", "operations_for", "resolve_backend",
    "unavailable_reason",
]  # fmt: skip

ENV_OVERRIDE = "KLDWRM_BACKEND"


def _override() -> Optional[str]:
    """The backend ``KLDWRM_BACKEND`` names for ``backend="auto"``, or None when it is unset or ``"auto"``."""
    override = os.environ.get(ENV_OVERRIDE, "").strip()
    if not override or override == "auto":
        return None
    if override not in BACKENDS:
        raise ValueError(f"Invalid {ENV_OVERRIDE}={override!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return override


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (one of :data:`~kldwrm_fast.ops.backends.IMPLEMENTATIONS`) that will run on
    ``device``."""
    return _decide(backend, device)[0]


def _decide(requested: str, device: torch.device) -> tuple[str, bool]:
    """``(resolved backend, whether calls are routed by the dispatch table)`` for ``requested`` on ``device``."""
    if requested not in BACKENDS:
        raise ValueError(f"Invalid backend: {requested!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if requested == "auto":
        override = _override()
        if override is not None:
            return _decide(override, device)[0], False
        runnable = runnable_auto_order(device) if device.type == "cuda" else []
        return (runnable[0] if runnable else "torch"), device.type == "cuda"
    reason = unavailable_reason(requested, device)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run: {reason}; use backend='auto' or 'torch'")
    return requested, False


def operations_for(requested: str, device: torch.device) -> tuple[str, Operations]:
    """``(resolved backend, its operations)`` for an optimizer's ``backend`` argument on ``device``: ``"auto"`` on
    CUDA tensors (without a ``KLDWRM_BACKEND`` override) routes each call by the dispatch table among the
    backends that can run; anything else is the one backend :func:`resolve_backend` names."""
    backend, routed = _decide(requested, device)
    if not routed:
        return backend, operations(backend)
    names = runnable_auto_order(device) + ["torch"]
    return backend, routed_operations({name: operations(name) for name in names}, current_table())
