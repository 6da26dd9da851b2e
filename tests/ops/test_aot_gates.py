"""The ahead-of-time gates of ``.ci/run`` (tools/triton_aot.py, tools/cuda_build_gate.py) judge correctly:
each check is shown to fire on a report that should fail it, so a gate that passes means something."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import cuda_build_gate  # noqa: E402
import triton_aot  # noqa: E402

PTX_ENTRY = """
.visible .entry _kernel(
	.param .u64 .ptr .global .align 1 _kernel_param_0,
	.param .u32 _kernel_param_1,
	.param .f32 _kernel_param_2,
	.param .f64 _kernel_param_3
)
"""


def test_scalar_parameter_types_are_read_from_the_ptx_entry():
    assert triton_aot.scalar_params(PTX_ENTRY) == ["u32", "f32", "f64"]


PTXAS_LOG = """
ptxas info    : Compiling entry function '_ZN6kldwrm4gemmIdEEv' for 'sm_90'
ptxas info    : Used 128 registers, used 1 barriers, 17664 bytes smem
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN6kldwrm4ghatIfEEv' for 'sm_90'
    24 bytes stack frame, 20 bytes spill stores, 16 bytes spill loads
"""


def test_ptxas_spills_are_found_in_the_build_log():
    reports = cuda_build_gate.ptxas_reports(PTXAS_LOG)
    assert [(r[0], r[2], r[3]) for r in reports] == [("_ZN6kldwrm4gemmIdEEv", 0, 0), ("_ZN6kldwrm4ghatIfEEv", 20, 16)]


COMPILE_ONE = """
import sys
sys.path.insert(0, {tools!r})
import torch
import triton
import triton.language as tl
import triton_aot

@triton.jit
def scale(pointer, plain, wide: tl.float64):
    tl.store(pointer, tl.load(pointer) * plain * wide)

sink = []
with triton_aot.compile_only(90, sink):
    scale[(1,)](torch.ones(1, dtype=torch.float64), 0.5, 0.5)
kernel = sink[0][1]
print(triton_aot.scalar_params(kernel.asm["ptx"]), triton_aot.resources(kernel.asm["cubin"])[1:])
"""


def test_a_kernel_compiles_for_sm90_without_a_gpu_and_its_scalar_widths_show(tmp_path):
    """The gate's stand-in driver compiles for sm_90 here; an unannotated Python float arrives as ``.f32``
    (the defect the gate catches), an annotated one as ``.f64``. Run without the interpreter, in a child."""
    pytest.importorskip("triton")
    import os
    import subprocess

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = COMPILE_ONE.format(tools=str(pathlib.Path(triton_aot.__file__).parent))
    (tmp_path / "compile_one.py").write_text(script)  # Triton reads a kernel's source from its file
    result = subprocess.run(
        [sys.executable, str(tmp_path / "compile_one.py")], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["['f32',", "'f64']", "(0,", "0)"]


def test_the_warp_table_is_the_installed_triton_releases_or_the_nearest():
    """Register allocation differs between Triton releases (the table tuned with 3.8 spilled with 3.6), so the
    launchers read the table tuned with their own release, else the nearest one tuned."""
    pytest.importorskip("triton")
    import json

    import triton

    from kldwrm_fast.ops.triton_kernels import common

    assert [common.release(v) for v in ("3.6.0", "3.8.0+git1a2b", "3.10.0rc1", "4.0rc1")] == [
        "3.6",
        "3.8",
        "3.10",
        "4.0",
    ]
    tables = {"3.6": "a", "3.8": "b", "3.10": "c"}
    assert [common.nearest_release(tables, r) for r in ("3.6", "3.7", "3.9", "3.12", "2.1")] == [
        "3.6", "3.8", "3.10", "3.10", "3.6",
    ]  # fmt: skip
    assert common.nearest_release({}, "3.6") is None
    on_disk = json.loads(common.WARPS_TABLE_FILE.read_text())
    assert {"3.6", "3.8"} <= set(on_disk)  # the GPU machines' release and CI's
    assert common.WARPS_TABLE == on_disk[common.nearest_release(on_disk, common.release(triton.__version__))]


def test_retuning_some_targets_keeps_the_other_targets_and_releases(tmp_path, monkeypatch):
    """``--tune --arch 90`` rewrites the installed release's sm_90 entries only: its sm_80 entries and the other
    releases' tables stay (they were dropped once)."""
    pytest.importorskip("triton")
    import json

    import triton

    from kldwrm_fast.ops.triton_kernels import common

    installed = common.release(triton.__version__)
    tables = {installed: {"80": {"k80": 8}, "90": {"old": 2}}, "0.1": {"90": {"other": 16}}}
    path = tmp_path / "warps.json"
    monkeypatch.setattr(common, "WARPS_TABLE_FILE", path)
    monkeypatch.setattr(common, "WARPS_TABLES", tables)
    monkeypatch.setattr(common, "WARPS_TABLE", tables[installed])
    monkeypatch.setattr(triton_aot, "tune", lambda arch: ({"new": 8}, []))
    triton_aot.retune([90])
    assert json.loads(path.read_text()) == {
        installed: {"80": {"k80": 8}, "90": {"new": 8}},
        "0.1": {"90": {"other": 16}},
    }
