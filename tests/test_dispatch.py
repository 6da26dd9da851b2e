"""Backend choice (SPEC §5): one dispatch point, explicit requests that cannot run raise."""

import pytest
import torch

from kldwrm_fast import QKLDWRM
from kldwrm_fast.ops import resolve_backend

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu():
    assert resolve_backend("auto", CPU) == "torch"
    assert QKLDWRM(torch.nn.Linear(2, 2)).backend == "torch"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_an_explicit_backend_that_cannot_run_raises_saying_why(backend):
    with pytest.raises(RuntimeError, match=rf"backend='{backend}' cannot run: .*CUDA tensors only"):
        QKLDWRM(torch.nn.Linear(2, 2), backend=backend)


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
