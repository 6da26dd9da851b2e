import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter, which must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Every test starts from the same RNG state and without a backend override from the environment."""
    torch.manual_seed(0)
    monkeypatch.delenv("KLDWRM_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device; without one they are skipped, not failed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
