"""The one place where a backend for the fused operations is chosen (docs/algorithms.md §5).

``backend="auto"`` takes the environment override ``KLDWRM_BACKEND`` when set; otherwise, on CUDA tensors,
each call goes to the implementation the dispatch table names for its operation and size class among those
that can run (:mod:`kldwrm_fast.ops.dispatch_table`; the eigensolver, and the backend the optimizer reports,
are those of the first of CUDA extension and Triton that can run), and on CPU tensors to PyTorch. It never
fails where ``"torch"`` works.
An explicit backend forces its implementation for every call; one that cannot run raises ``RuntimeError``
saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from kldwrm_fast.ops.dispatch_table import SIZE_CLASSES, current_table, size_class
from kldwrm_fast.ops.table import NAMES, OPERATIONS

ENV_OVERRIDE = "KLDWRM_BACKEND"

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

    def __getattr__(self, name: str) -> Callable:
        functions = REFERENCE_FUNCTIONS if torch.compiler.is_compiling() else self.__dict__["functions"]
        try:
            return functions[name]
        except KeyError:
            raise AttributeError(name) from None


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
        return "the CUDA extension kldwrm_fast._C was not built (see README, 'CUDA extension')"
    return _cuda_extension_fault(str(device))


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
"""The backends, by name. Adding one: an entry here (and in :data:`AUTO_ORDER` if ``"auto"`` may pick it)."""

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
    """The concrete backend (one of :data:`IMPLEMENTATIONS`) that will run on ``device``."""
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
            for candidate in AUTO_ORDER:
                if unavailable_reason(candidate, device) is None:
                    return candidate
        return "torch"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} cannot run: {reason}; use backend='auto' or 'torch'")
    return backend


def operations(backend: str) -> Operations:
    """The registered operations of a resolved backend."""
    if backend not in REGISTRY:
        raise RuntimeError(f"no operations are registered for backend {backend!r}")
    return REGISTRY[backend].load()


def _router(name: str, by_size: dict[str, Callable]) -> Callable:
    def call(*args):
        return by_size[size_class(name, args)](*args)

    call.__name__ = call.__qualname__ = name
    return call


def routed_operations(implementations: dict[str, Operations], table: dict[str, dict[str, str]]) -> Operations:
    """``auto`` on a GPU: per call, the implementation ``table`` names for the operation and its size class
    (:mod:`kldwrm_fast.ops.dispatch_table`), among ``implementations`` (by backend name, the preferred first); a
    name not among them falls back to the first. The eigensolver is the first implementation's."""
    preferred = next(iter(implementations))
    functions = {}
    for name in NAMES:
        chosen = {
            size: table[name][size] if table[name][size] in implementations else preferred for size in SIZE_CLASSES
        }
        by_size = {size: implementations[backend].functions[name] for size, backend in chosen.items()}
        distinct = set(chosen.values())
        functions[name] = by_size["small"] if len(distinct) == 1 else _router(name, by_size)
    label = "auto(" + ", ".join(implementations) + ")"
    return Operations(label, functions, eigh=implementations[preferred].eigh)


def operations_for(requested: str, device: torch.device) -> tuple[str, Operations]:
    """``(resolved backend, its operations)`` for an optimizer's ``backend`` argument on ``device``: ``"auto"`` on
    CUDA tensors (without a ``KLDWRM_BACKEND`` override) routes each call by the dispatch table among the
    backends that can run; anything else is the one backend :func:`resolve_backend` names."""
    backend = resolve_backend(requested, device)
    override = os.environ.get(ENV_OVERRIDE, "").strip() not in ("", "auto")
    if requested != "auto" or override or device.type != "cuda":
        return backend, operations(backend)
    names = [name for name in AUTO_ORDER if unavailable_reason(name, device) is None] + ["torch"]
    return backend, routed_operations({name: operations(name) for name in names}, current_table())
