"""The build script skips the CUDA extension with a reason instead of failing on CPU machines, and the package
works without the extension."""

import importlib.util
import pathlib
import subprocess
import sys
import textwrap

import pytest

SETUP = pathlib.Path(__file__).resolve().parent.parent / "setup.py"


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("kldwrm_setup", SETUP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_variable_gives_a_reason(setup_module, monkeypatch):
    monkeypatch.setenv("KLDWRM_SKIP_CUDA_BUILD", "1")
    assert setup_module.cuda_extension_or_reason() == "KLDWRM_SKIP_CUDA_BUILD=1 is set"


def test_cuda_home_is_honoured(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert setup_module.toolkit_root() == str(tmp_path)


WITHOUT_THE_EXTENSION = textwrap.dedent(
    """
    import sys

    sys.modules["kldwrm_fast._C"] = None  # importing it fails, as where it was not built
    import torch

    import kldwrm_fast
    from kldwrm_fast.ops.backends import unavailable_reason

    model = torch.nn.Linear(3, 2)
    opt = kldwrm_fast.KFAC(model, stat_freq=1, inv_freq=1)
    before = model.weight.detach().clone()
    torch.nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    print(opt.backend, bool((model.weight != before).any()), unavailable_reason("cuda", torch.device("cuda")))
    """
)


def test_the_package_imports_and_steps_without_the_extension():
    """In a process where ``kldwrm_fast._C`` cannot be imported (even where CI built it), the package imports, an
    optimizer steps on the PyTorch path, and the CUDA backend's reason names the missing extension."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_THE_EXTENSION], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    backend, moved, reason = result.stdout.strip().split(maxsplit=2)
    assert (backend, moved) == ("torch", "True")
    assert "kldwrm_fast._C was not built" in reason
