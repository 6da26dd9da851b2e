"""The GPU check script runs end to end (tiny shapes on CPU) and reports every operation."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_smoke_run_reports_every_operation(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for op in ("factor_update", "precondition", "q_precondition", "ghat_recursion"):
        assert f"{op} " in result.stdout
    assert "triton" in result.stdout and (tmp_path / "rows.json").exists()
