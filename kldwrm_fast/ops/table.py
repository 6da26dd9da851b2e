"""The fused operations, listed once (docs/algorithms.md §6): name, schema, reference implementation, fake.

Everything that needs the list of operations reads this table: the ``torch.library`` registration of each
backend (:func:`kldwrm_fast.ops.library.register`), the CUDA extension's loader (:mod:`kldwrm_fast.ops.cuda_ext`),
the dispatch point's :class:`~kldwrm_fast.ops.operations.Operations`, the tests, and the check of the
hand-written C++ schemas in ``csrc/registration.cpp`` against it (``tests/ops/test_operation_table.py``).

Adding an operation: a row here, its reference in :mod:`kldwrm_fast.ops.reference`, its Triton and CUDA
implementations (registered under the same schema with the suffixes ``_triton`` and ``_cuda``), and tests.
The eigensolver is not in the table: it is the CUDA backend's alone (``eigh_cuda``); other backends use
``torch.linalg.eigh`` (:mod:`kldwrm_fast.curvature.eigen`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kldwrm_fast.ops import reference

NAMESPACE = "kldwrm_fast"


@dataclass(frozen=True)
class Operation:
    """One fused operation.

    Attributes:
        name: the reference op's name; backends register ``name + suffix``.
        schema: ``(arguments) -> returns`` in the ``torch.library`` schema language; mutated arguments carry
            alias annotations (``Tensor(a1!)``).
        reference: the PyTorch implementation (:mod:`kldwrm_fast.ops.reference`), the oracle of every backend.
        fake: the meta implementation (shapes and dtypes only) that ``torch.compile`` traces through.
    """

    name: str
    schema: str
    reference: Callable
    fake: Callable

    def qualified_name(self, suffix: str = "") -> str:
        return f"{NAMESPACE}::{self.name}{suffix}"

    def definition(self, suffix: str = "") -> str:
        """The schema with its name, as ``m.def`` in C++ or ``torch.library.define`` take it."""
        return f"{self.name}{suffix}{self.schema}"

    @property
    def mutates(self) -> tuple[str, ...]:
        """The arguments the operation writes in place (from the schema's alias annotations)."""
        parsed = torch._C.parse_schema(self.definition())
        return tuple(arg.name for arg in parsed.arguments if arg.alias_info is not None and arg.alias_info.is_write)


def _factor_update_fake(x, ea, reweighted, scale, rho, reweight, first, with_reweighted):
    return ea.new_empty(ea.shape)


def _precondition_fake(q_g, d_g, q_a, d_a, v, damping):
    return torch.empty_like(v)


def _q_precondition_fake(q_g, d_g, q_a, d_a, g_hat, damping, lr, ea_g, ea_a):
    return torch.empty_like(g_hat), torch.empty_like(g_hat)


def _ghat_recursion_fake(v_new, g_hat, v_prev, m, coef):
    return None


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "factor_update",
        "(Tensor x, Tensor(a1!) ea, Tensor(a2!) reweighted, float scale, float rho, float reweight, bool first, "
        "bool with_reweighted) -> Tensor",
        reference.factor_update,
        _factor_update_fake,
    ),
    Operation(
        "precondition",
        "(Tensor q_g, Tensor d_g, Tensor q_a, Tensor d_a, Tensor v, float damping) -> Tensor",
        reference.precondition,
        _precondition_fake,
    ),
    Operation(
        "q_precondition",
        "(Tensor q_g, Tensor d_g, Tensor q_a, Tensor d_a, Tensor g_hat, float damping, float lr, "
        "Tensor ea_g, Tensor ea_a) -> (Tensor, Tensor)",
        reference.q_precondition,
        _q_precondition_fake,
    ),
    Operation(
        "ghat_recursion",
        "(Tensor[] v_new, Tensor(a1!)[] g_hat, Tensor(a2!)[] v_prev, Tensor[] m, float coef) -> ()",
        reference.ghat_recursion,
        _ghat_recursion_fake,
    ),
)

NAMES: tuple[str, ...] = tuple(operation.name for operation in OPERATIONS)
