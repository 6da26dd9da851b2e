"""The build script skips the CUDA extension with a reason instead of failing on CPU machines."""

import importlib.util
import pathlib

import pytest

import kldwrm_fast

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


def test_package_imports_without_the_extension():
    assert {"KFAC", "SOKLDWRM", "QKLDWRM"} <= set(kldwrm_fast.__all__)
