"""The one place where a backend for the fused operations is chosen (docs/algorithms.md §5).

``backend="auto"`` takes the environment override ``KLDWRM_BACKEND`` when set; otherwise, on CUDA tensors,
the fastest backend that can run (CUDA extension, then Triton, then PyTorch), and PyTorch on CPU tensors.
It never fails where ``"torch"`` works. An explicit backend that cannot run raises ``RuntimeError`` saying
why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kldwrm_fast.ops import reference
from kldwrm_fast.ops.library import REFERENCE_OPS

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_OVERRIDE = "KLDWRM_BACKEND"


@dataclass(frozen=True)
class Operations:
    """The four fused operations of one backend (signatures of :mod:`kldwrm_fast.ops.reference`) and its
    batched eigensolver (:data:`kldwrm_fast.curvature.eigen.BatchedSolver`; None: ``torch.linalg.eigh``).

    ``takes_unbatched``: the matrix operations also accept single blocks without a leading batch dimension
    (the PyTorch reference does; the kernels take a stacked batch).
    """

    backend: str
    factor_update: Callable
    precondition: Callable
    q_precondition: Callable
    ghat_recursion: Callable
    eigh: Optional[Callable] = None
    takes_unbatched: bool = False


def validate_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ``ValueError`` naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return f"the 'triton' backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device}"
    if device.type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors only, and the parameters are on {device}"
    if importlib.util.find_spec("kldwrm_fast._C") is None:
        return "the CUDA extension kldwrm_fast._C was not built (see README, 'CUDA extension')"
    return _cuda_extension_fault(str(device))


@functools.lru_cache(maxsize=None)
def _cuda_extension_fault(device: str) -> Optional[str]:
    """Why the built extension cannot run on ``device`` (it fails to load, or has no kernel for this GPU's
    architecture), found once per device by loading it and running one tiny operation; None when it runs."""
    try:
        from kldwrm_fast.ops.cuda_ext import CUDA_OPS

        one = torch.zeros(1, device=device)
        CUDA_OPS["ghat_recursion"]([one], [one.clone()], [one.clone()], [one], 1.0)
        torch.cuda.synchronize(device)
    except (ImportError, OSError, RuntimeError) as error:
        return f"the CUDA extension kldwrm_fast._C cannot run on {device}: {error}"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"cuda"``) that will run on ``device``."""
    validate_backend(backend)
    if backend == "auto":
        override = os.environ.get(ENV_OVERRIDE, "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(
                    f"Invalid {ENV_OVERRIDE}={override!r}; expected one of {', '.join(map(repr, BACKENDS))}"
                )
            return resolve_backend(override, device)
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}; use backend='auto' or 'torch'")
    return backend


def operations(backend: str) -> Operations:
    """The registered operations of a resolved backend."""
    if backend == "torch":
        # The reference functions themselves: the registered kldwrm_fast::<op> wraps the same code, and its
        # custom-op dispatch costs ~65 µs a call on CPU (measured), several per step; plain PyTorch code
        # needs no opaque op to be traced by torch.compile.
        return Operations(backend, **{name: getattr(reference, name) for name in REFERENCE_OPS}, takes_unbatched=True)
    if backend == "triton":
        from kldwrm_fast.ops.triton_kernels import TRITON_OPS

        return Operations(backend, **TRITON_OPS)
    if backend == "cuda":
        from kldwrm_fast.ops.cuda_ext import CUDA_OPS, eigh

        return Operations(backend, **CUDA_OPS, eigh=eigh)
    raise RuntimeError(f"no operations are registered for backend {backend!r}")
