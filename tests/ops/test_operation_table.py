"""One table of operations (kldwrm_fast/ops/table.py): every registration, the C++ schemas and the dispatch point
agree with it."""

import pathlib
import re

import pytest

from kldwrm_fast.ops import backends as dispatch
from kldwrm_fast.ops.library import REFERENCE_OPS, register
from kldwrm_fast.ops.table import NAMES, OPERATIONS
from kldwrm_fast.ops.triton_kernels import TRITON_OPS

REGISTRATION = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "registration.cpp"


def cpp_definitions() -> dict[str, str]:
    """The schemas ``m.def`` gives in ``csrc/registration.cpp`` (adjacent string literals joined), by name."""
    text = REGISTRATION.read_text()
    definitions = {}
    for call in re.findall(r"m\.def\((.*?)\);", text, flags=re.DOTALL):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        definitions[schema.split("(", 1)[0]] = schema
    return definitions


def test_the_cpp_schemas_are_the_table_s():
    definitions = cpp_definitions()
    assert set(definitions) == {f"{name}_cuda" for name in NAMES} | {"eigh_cuda"}
    for operation in OPERATIONS:
        assert definitions[f"{operation.name}_cuda"] == operation.definition("_cuda")


@pytest.mark.parametrize("ops,suffix", [(REFERENCE_OPS, ""), (TRITON_OPS, "_triton")])
def test_each_backend_registers_every_operation_with_the_table_s_schema(ops, suffix):
    assert list(ops) == list(NAMES)
    for operation in OPERATIONS:
        registered = str(ops[operation.name]._opoverload._schema)
        assert registered == f"kldwrm_fast::{operation.definition(suffix)}"


def test_mutated_arguments_come_from_the_schema():
    mutates = {operation.name: operation.mutates for operation in OPERATIONS}
    expected = {"factor_update": ("ea", "reweighted"), "ghat_recursion": ("g_hat", "v_prev")}
    assert mutates == {"precondition": (), "q_precondition": (), **expected}


def test_a_backend_without_every_operation_is_refused():
    partial = {operation.name: operation.reference for operation in OPERATIONS[:-1]}
    with pytest.raises(ValueError, match="ghat_recursion"):
        register("_partial", partial)
    with pytest.raises(ValueError, match="ghat_recursion"):
        dispatch.Operations("partial", partial)


def test_the_dispatch_point_serves_every_operation_of_every_available_backend():
    assert dispatch.BACKENDS == ("auto", *dispatch.REGISTRY)
    ops = dispatch.operations("torch")
    for operation in OPERATIONS:
        assert getattr(ops, operation.name) is operation.reference
