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
