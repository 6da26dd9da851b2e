"""The bench scripts run end to end on CPU: the GPU check (tiny shapes) and the interleaved step-time comparison."""

import json
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


def run_compare(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compare_step_time.py"), "--workload", "paper-cnn", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_step_time_comparison_gives_every_entry_a_ratio_per_round(tmp_path):
    out = tmp_path / "ratios.json"
    result = run_compare(
        "--cadence", "every-step", "--entries", "sgd,kfac-torch", "--repeats", "2", "--min-steps", "1",
        "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entries = json.loads(out.read_text())["entries"]
    assert list(entries) == ["sgd", "kfac-torch"]
    assert entries["sgd"]["ratio"] == [1.0, 1.0]
    assert len(entries["kfac-torch"]["ms"]) == 2 and all(r > 0 for r in entries["kfac-torch"]["ratio"])
    assert "kfac-torch" in result.stdout


def test_step_time_comparison_names_an_unknown_entry():
    result = run_compare("--cadence", "30/30", "--entries", "sgd,lbfgs")
    assert result.returncode == 2 and "lbfgs" in result.stderr
