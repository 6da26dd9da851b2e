"""Which implementation ``backend="auto"`` uses on a GPU, per operation and size class (docs/algorithms.md §6), and
the routed operations that follow it.

``auto`` on CUDA tensors does not send every call to one backend: each call of a fused operation goes to the
implementation this table names for its size class, among those that can run (the CUDA extension, Triton,
PyTorch). ``backend="cuda"``, ``"triton"`` and ``"torch"`` still force one implementation for every call.

Size class of a call, from the arithmetic it does (:func:`size_class`): ``"small"`` below 2²⁴ multiply-adds,
``"large"`` from 2³⁰, ``"medium"`` between. The defaults (:data:`DEFAULT_TABLE`), reasoned, not yet measured
on a GPU:

- ``factor_update``, ``precondition``, ``q_precondition``, small and medium: our kernels. Torch would issue
  several launches per call (a GEMM, then separate passes for the EA epilogue, the damped division, the
  mirror) where ours issue one (factor update) or one per GEMM with the epilogue fused, and below ~1 GFLOP the
  launches and extra passes over ``n²`` cost more than the GEMM rate gains.
- Same ops, large: PyTorch (cuBLAS). From about a GFLOP per call the GEMM dominates; our tile kernel is plain
  FMA on 64×64 tiles, and cuBLAS's FP32 GEMM runs several times faster at those sizes, while the extra
  element-wise passes cost ``O(n²)`` against ``O(n³)``.
- ``ghat_recursion``, every class: our kernel. It is memory-bound, and one multi-tensor launch for every
  block reads and writes each element once; PyTorch's ``_foreach`` ops make four passes.

Blocks with a diagonal factor side (embeddings, normalisation layers, sides wider than ``max_factor_dim``) are not
routed: their ``precondition`` and ``q_precondition`` run the PyTorch reference on every backend, ``auto`` and
forced ones alike (:class:`kldwrm_fast.curvature.batching.BlockBatches`), since the kernels take dense factors.

``python bench/gpu_check.py --tune FILE`` measures every operation on every available backend and writes the
fastest per operation and size class; ``KLDWRM_DISPATCH_TABLE=FILE`` makes ``auto`` read it (entries it lacks
keep the defaults). A backend a table names that cannot run on the device falls back to the first of
:data:`kldwrm_fast.ops.backends.AUTO_ORDER` that can, then to PyTorch.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Mapping

from torch import Tensor

from kldwrm_fast.ops.backends import IMPLEMENTATIONS
from kldwrm_fast.ops.operations import Operations
from kldwrm_fast.ops.table import NAMES

ENV_TABLE = "KLDWRM_DISPATCH_TABLE"
SIZE_CLASSES = ("small", "medium", "large")
SMALL_BELOW, LARGE_FROM = 2**24, 2**30
"""Multiply-adds per call: below ``SMALL_BELOW`` a call is small, from ``LARGE_FROM`` large."""

DEFAULT_TABLE: dict[str, dict[str, str]] = {
    "factor_update": {"small": "cuda", "medium": "cuda", "large": "torch"},
    "precondition": {"small": "cuda", "medium": "cuda", "large": "torch"},
    "q_precondition": {"small": "cuda", "medium": "cuda", "large": "torch"},
    "ghat_recursion": {"small": "cuda", "medium": "cuda", "large": "cuda"},
}


def multiply_adds(name: str, args: tuple) -> int:
    """The multiply-adds (element updates for the recursion) of one call of operation ``name``."""
    if name == "factor_update":
        rows, n = args[0].shape
        return rows * n * n
    if name in ("precondition", "q_precondition"):
        v: Tensor = args[4]
        n_out, n_in = v.shape[-2:]
        batch = v.numel() // (n_out * n_in) if n_out * n_in else 0
        products = 2 if name == "precondition" else 3  # Q also forms M = Γ̄ S Ā
        return batch * products * (n_out * n_out * n_in + n_out * n_in * n_in)
    if name == "ghat_recursion":
        return sum(t.numel() for t in args[1])
    raise ValueError(f"unknown operation {name!r}")


def size_class(name: str, args: tuple) -> str:
    """``"small"``, ``"medium"`` or ``"large"`` for one call (module docstring)."""
    work = multiply_adds(name, args)
    return "small" if work < SMALL_BELOW else "large" if work >= LARGE_FROM else "medium"


def validated(table: object, source: str) -> dict[str, dict[str, str]]:
    """``table`` as ``{operation: {size class: backend}}``; a ``ValueError`` naming ``source`` and the fault."""
    if not isinstance(table, dict):
        raise ValueError(f"Invalid dispatch table {source}: expected a JSON object of operations")
    for name, classes in table.items():
        if name not in NAMES:
            raise ValueError(f"Invalid dispatch table {source}: unknown operation {name!r}; expected one of {NAMES}")
        if not isinstance(classes, dict):
            raise ValueError(f"Invalid dispatch table {source}: {name!r} must map size classes to backends")
        for size, backend in classes.items():
            if size not in SIZE_CLASSES:
                raise ValueError(
                    f"Invalid dispatch table {source}: {name}.{size} is not a size class; expected one of "
                    f"{SIZE_CLASSES}"
                )
            if backend not in IMPLEMENTATIONS:
                raise ValueError(
                    f"Invalid dispatch table {source}: {name}.{size} = {backend!r}; expected one of {IMPLEMENTATIONS}"
                )
    return table


def current_table(environ: Mapping[str, str] = os.environ) -> dict[str, dict[str, str]]:
    """The defaults, updated from the JSON file ``KLDWRM_DISPATCH_TABLE`` names (when set)."""
    table = {name: dict(classes) for name, classes in DEFAULT_TABLE.items()}
    path = environ.get(ENV_TABLE, "").strip()
    if not path:
        return table
    source = f"{ENV_TABLE}={path!r}"
    try:
        with open(path) as handle:
            loaded = json.load(handle)
    except OSError as error:
        raise ValueError(f"Invalid {source}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Invalid {source}: not JSON ({error.msg} at line {error.lineno})") from None
    for name, classes in validated(loaded, source).items():
        table[name].update(classes)
    return table


def _router(name: str, by_size: dict[str, Callable]) -> Callable:
    def call(*args):
        return by_size[size_class(name, args)](*args)

    call.__name__ = call.__qualname__ = name
    return call


def routed_operations(implementations: dict[str, Operations], table: dict[str, dict[str, str]]) -> Operations:
    """``auto`` on a GPU: per call, the implementation ``table`` names for the operation and its size class, among
    ``implementations`` (by backend name, the preferred first); a name not among them falls back to the first.
    The eigensolver is the first implementation's."""
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
