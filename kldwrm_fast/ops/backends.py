"""The implementations of the fused operations, and why each can or cannot run on a device (docs/algorithms.md
§5). Adding a backend: an entry in :data:`REGISTRY` (and in :data:`AUTO_ORDER` if ``"auto"`` may pick it)."""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kldwrm_fast.ops.operations import REFERENCE_FUNCTIONS, Operations


def _torch_reason(device: torch.device) -> Optional[str]:
    return None


def _triton_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return f"the 'triton' backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {device}"


def _cuda_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the 'cuda' backend runs on CUDA tensors only, and the parameters are on {device}"
    if importlib.util.find_spec("kldwrm_fast._C") is None:
        return "the CUDA extension kldwrm_fast._C was not built (see docs/guide.md, 'CUDA extension')"
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


def _torch_operations() -> Operations:
    # The reference functions themselves: the registered kldwrm_fast::<op> wraps the same code, and its
    # custom-op dispatch costs ~65 µs a call on CPU (measured), several per step; plain PyTorch code
    # needs no opaque op to be traced by torch.compile.
    return Operations("torch", REFERENCE_FUNCTIONS, takes_unbatched=True)


def _triton_operations() -> Operations:
    from kldwrm_fast.ops.triton_kernels import TRITON_OPS

    return Operations("triton", TRITON_OPS)


def _cuda_operations() -> Operations:
    from kldwrm_fast.ops.cuda_ext import CUDA_OPS, eigh

    return Operations("cuda", CUDA_OPS, eigh=eigh)


@dataclass(frozen=True)
class Backend:
    """One implementation of the operations: why it cannot run on a device (None: it can), and its ops."""

    name: str
    unavailable_reason: Callable[[torch.device], Optional[str]]
    load: Callable[[], Operations]


REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("torch", _torch_reason, _torch_operations),
        Backend("triton", _triton_reason, _triton_operations),
        Backend("cuda", _cuda_reason, _cuda_operations),
    )
}
"""The backends, by name."""

AUTO_ORDER = ("cuda", "triton")
"""What ``backend="auto"`` tries on CUDA tensors, fastest first, before falling back to ``"torch"``."""

IMPLEMENTATIONS: tuple[str, ...] = tuple(REGISTRY)
BACKENDS: tuple[str, ...] = ("auto", *IMPLEMENTATIONS)


def validate_backend(backend: str) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`, else raise ``ValueError`` naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"Invalid backend: {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return backend


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    return REGISTRY[backend].unavailable_reason(device)


def runnable_auto_order(device: torch.device) -> list[str]:
    """The backends of :data:`AUTO_ORDER` that can run on ``device``, in that order."""
    return [name for name in AUTO_ORDER if unavailable_reason(name, device) is None]


def operations(backend: str) -> Operations:
    """The registered operations of a resolved backend."""
    if backend not in REGISTRY:
        raise RuntimeError(f"no operations are registered for backend {backend!r}")
    return REGISTRY[backend].load()
