"""Backend choice (docs/algorithms.md §5): one dispatch point, explicit requests that cannot run raise."""

import pytest
import torch

from kldwrm_fast import QKLDWRM
from kldwrm_fast.ops import operations, reference, resolve_backend

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu_even_when_the_triton_interpreter_is_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU) == "torch"
    assert QKLDWRM(torch.nn.Linear(2, 2)).backend == "torch"


def test_explicit_cuda_backend_on_cpu_raises_saying_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run: .*CUDA tensors only"):
        QKLDWRM(torch.nn.Linear(2, 2), backend="cuda")


def test_explicit_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run: .*TRITON_INTERPRET=1"):
        QKLDWRM(torch.nn.Linear(2, 2), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert QKLDWRM(torch.nn.Linear(2, 2), backend="triton").backend == "triton"


def test_environment_override_applies_to_auto(monkeypatch):
    monkeypatch.setenv("KLDWRM_BACKEND", "torch")
    assert resolve_backend("auto", CPU) == "torch"
    monkeypatch.setenv("KLDWRM_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        resolve_backend("auto", CPU)
    assert resolve_backend("torch", CPU) == "torch"


def test_invalid_environment_override_is_named(monkeypatch):
    monkeypatch.setenv("KLDWRM_BACKEND", "fast")
    with pytest.raises(ValueError, match="KLDWRM_BACKEND='fast'"):
        resolve_backend("auto", CPU)


def test_torch_operations_are_the_reference_functions_the_registered_ops_wrap():
    ops = operations("torch")
    q, d, v = (
        torch.eye(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.randn(3, 3, dtype=torch.float64),
    )
    for name in ("factor_update", "precondition", "q_precondition", "ghat_recursion"):
        assert getattr(ops, name) is getattr(reference, name)
    assert torch.equal(ops.precondition(q, d, q, d, v, 0.5), torch.ops.kldwrm_fast.precondition(q, d, q, d, v, 0.5))


# The dispatch table: ``auto`` on a GPU routes each call by operation and size class.


def _recording_operations(backend, calls):
    """Operations whose functions record ``(backend, operation)`` and return the reference's result."""
    from kldwrm_fast.ops.operations import Operations
    from kldwrm_fast.ops.table import OPERATIONS

    def recorder(operation):
        def call(*args):
            calls.append((backend, operation.name))
            return operation.reference(*args)

        return call

    return Operations(backend, {op.name: recorder(op) for op in OPERATIONS}, eigh=f"{backend}-eigh")


def _precondition_args(batch, n_out, n_in):
    q_g, d_g = torch.eye(n_out).expand(batch, n_out, n_out), torch.ones(batch, n_out)
    q_a, d_a = torch.eye(n_in).expand(batch, n_in, n_in), torch.ones(batch, n_in)
    return q_g, d_g, q_a, d_a, torch.randn(batch, n_out, n_in), 0.01


def test_size_classes_follow_the_multiply_adds_of_a_call():
    from kldwrm_fast.ops import routing as dispatch_table

    assert dispatch_table.size_class("factor_update", (torch.empty(2**10, 2**7),)) == "medium"  # 2^24 exactly
    assert dispatch_table.size_class("factor_update", (torch.empty(2**10 - 1, 2**7),)) == "small"
    assert dispatch_table.size_class("factor_update", (torch.empty(2**16, 2**7),)) == "large"  # 2^30
    small = _precondition_args(2, 3, 5)
    assert dispatch_table.multiply_adds("precondition", small) == 2 * 2 * (9 * 5 + 3 * 25)
    assert dispatch_table.multiply_adds("q_precondition", small) == 2 * 3 * (9 * 5 + 3 * 25)
    lists = [[torch.empty(7), torch.empty(2**30)]]
    assert dispatch_table.size_class("ghat_recursion", (*lists * 4, 0.5)) == "large"


def test_auto_on_a_gpu_sends_each_call_where_the_table_says():
    from kldwrm_fast.ops.routing import routed_operations

    calls = []
    implementations = {name: _recording_operations(name, calls) for name in ("cuda", "torch")}
    table = {
        "factor_update": {"small": "cuda", "medium": "cuda", "large": "torch"},
        "precondition": {"small": "cuda", "medium": "torch", "large": "torch"},
        "q_precondition": {"small": "triton", "medium": "cuda", "large": "cuda"},  # triton unavailable: cuda
        "ghat_recursion": {"small": "torch", "medium": "torch", "large": "torch"},
    }
    ops = routed_operations(implementations, table)
    assert ops.eigh == "cuda-eigh"  # the preferred implementation's solver
    small, medium = _precondition_args(2, 3, 5), _precondition_args(1, 256, 257)
    torch.testing.assert_close(ops.precondition(*small), reference.precondition(*small))
    ops.precondition(*medium)
    ops.q_precondition(*small, 0.1, small[0], small[2])
    one = torch.zeros(3)
    ops.ghat_recursion([one], [one.clone()], [one.clone()], [one.clone()], 0.5)
    assert calls == [
        ("cuda", "precondition"), ("torch", "precondition"), ("cuda", "q_precondition"), ("torch", "ghat_recursion"),
    ]  # fmt: skip
    assert ops.ghat_recursion is implementations["torch"].functions["ghat_recursion"]  # one choice: no router


def test_a_measured_table_from_the_environment_updates_the_defaults(tmp_path, monkeypatch):
    from kldwrm_fast.ops import routing as dispatch_table

    path = tmp_path / "table.json"
    path.write_text('{"precondition": {"large": "cuda"}}')
    monkeypatch.setenv("KLDWRM_DISPATCH_TABLE", str(path))
    table = dispatch_table.current_table()
    assert table["precondition"] == {"small": "cuda", "medium": "cuda", "large": "cuda"}
    assert table["factor_update"] == dispatch_table.DEFAULT_TABLE["factor_update"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", r"not JSON \(Expecting property name"),
        ("[]", "expected a JSON object of operations"),
        ('{"eigh": {}}', "unknown operation 'eigh'"),
        ('{"precondition": {"huge": "cuda"}}', "precondition.huge is not a size class"),
        ('{"precondition": {"large": "cublas"}}', r"precondition.large = 'cublas'; expected one of \("),
        (None, r"cannot read it \(No such file or directory\)"),
    ],
)
def test_a_bad_dispatch_table_is_one_line_naming_the_variable(tmp_path, monkeypatch, content, message):
    from kldwrm_fast.ops import routing as dispatch_table

    path = tmp_path / "table.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("KLDWRM_DISPATCH_TABLE", str(path))
    with pytest.raises(ValueError, match=r"^Invalid (dispatch table )?KLDWRM_DISPATCH_TABLE='.*'(:| ).*" + message):
        dispatch_table.current_table()


def test_an_explicit_backend_and_the_cpu_are_never_routed(monkeypatch, tmp_path):
    from kldwrm_fast.ops import operations_for

    path = tmp_path / "table.json"
    path.write_text("{")  # would raise if it were read
    monkeypatch.setenv("KLDWRM_DISPATCH_TABLE", str(path))
    assert operations_for("auto", CPU) == ("torch", operations("torch"))
    assert operations_for("torch", CPU)[1].backend == "torch"
