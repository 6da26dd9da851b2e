import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Every test starts from the same RNG state and without a backend override from the environment."""
    torch.manual_seed(0)
    monkeypatch.delenv("KLDWRM_BACKEND", raising=False)
