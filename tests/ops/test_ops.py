"""Every registered operation: opcheck, and each backend against the PyTorch reference on odd shapes."""

import importlib

import helpers.matrices as matrices
import helpers.op_inputs as op_inputs
import pytest
import torch

from kldwrm_fast.ops import operations
from kldwrm_fast.ops.library import REFERENCE_OPS

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = "cpu"
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before import", allow_module_level=True)

from kldwrm_fast.ops.triton_kernels import TRITON_OPS  # noqa: E402

BACKENDS = {"torch": REFERENCE_OPS, "triton": TRITON_OPS}
SIZES = [1, 3, 17, 33]
DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def spd(n, dtype, batch=()):
    return matrices.spd(n, dtype, batch, DEVICE)


def preconditioner_inputs(n_out, n_in, dtype, batch=()):
    return op_inputs.preconditioner_inputs(n_out, n_in, dtype, batch, DEVICE)


def captured_rows(rows: int, n: int, dtype, layout: str):
    """(rows, n) rows as a layer captures them: row-major, or feature-major (a convolution's, the transpose of a
    contiguous (n, rows) tensor)."""
    if layout == "feature-major":
        return torch.randn(n, rows, dtype=dtype, device=DEVICE).T
    return torch.randn(rows, n, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("first,with_reweighted", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
def test_factor_update_matches_reference(dtype, n, first, with_reweighted, layout):
    x = captured_rows(2 * n + 5, n, dtype, layout)
    ea = spd(n, dtype)
    results = {}
    for name, ops in BACKENDS.items():
        average, reweighted = ea.clone(), torch.full_like(ea, 7.0)
        local = ops["factor_update"](x, average, reweighted, 0.3, 0.9, 1.2, first, with_reweighted)
        results[name] = (local, average, reweighted)
        assert torch.equal(local, local.mT) and torch.equal(average, average.mT)
    for ours, ref in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])
    if not with_reweighted:
        assert (results["triton"][2] == 7.0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,n,chunks",
    [(100, 5, 4), (96, 5, 3), (33, 40, 2), (1, 5, 1), (70, 17, 3)],
    ids=["partial-last-chunk", "exact-chunks", "chunk-edge-two-tiles", "one-row", "odd"],
)
@pytest.mark.parametrize("first,with_reweighted", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
def test_the_row_parallel_factor_update_matches_reference(
    monkeypatch, dtype, rows, n, chunks, first, with_reweighted, layout
):
    """Chunks of 32 rows (the row tile) force the two-stage path on small inputs: chunk edges, a partial last chunk,
    several tiles, one row. Exactly symmetric, and the same result on a second run (fixed reduction order)."""
    kernels = importlib.import_module("kldwrm_fast.ops.triton_kernels.factor_update")
    monkeypatch.setattr(kernels, "ROWS_PER_CHUNK", 32)
    block_n, block_r = kernels.tile(n, largest=kernels.LARGEST_TILE[dtype]), kernels.tile(rows, largest=32)
    assert kernels.row_chunks(rows, n, block_n, block_r)[0] == chunks
    x = captured_rows(rows, n, dtype, layout)
    ea = spd(n, dtype)
    expected = [ea.clone(), torch.full_like(ea, 7.0)]
    local_expected = REFERENCE_OPS["factor_update"](x, *expected, 0.3, 0.9, 1.2, first, with_reweighted)
    runs = []
    for _ in range(2):
        average, reweighted = ea.clone(), torch.full_like(ea, 7.0)
        local = TRITON_OPS["factor_update"](x, average, reweighted, 0.3, 0.9, 1.2, first, with_reweighted)
        assert torch.equal(local, local.mT) and torch.equal(average, average.mT)
        runs.append((local, average, reweighted))
    for ours, ref in zip(runs[0], (local_expected, *expected)):
        torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,n_in", [(1, 1), (3, 17), (17, 3), (33, 33), (2, 33)])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["single", "batch3"])
def test_precondition_matches_reference(dtype, n_out, n_in, batch):
    inputs = preconditioner_inputs(n_out, n_in, dtype, batch)
    expected = REFERENCE_OPS["precondition"](*inputs, 0.01)
    torch.testing.assert_close(TRITON_OPS["precondition"](*inputs, 0.01), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_out,n_in", [(1, 3), (17, 1), (3, 33)])
@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batch2"])
def test_q_precondition_matches_reference(dtype, n_out, n_in, batch):
    q_g, d_g, q_a, d_a, g_hat = preconditioner_inputs(n_out, n_in, dtype, batch)
    ea_g, ea_a = spd(n_out, dtype, batch), spd(n_in, dtype, batch)
    args = (q_g, d_g, q_a, d_a, g_hat, 0.02, 0.1, ea_g, ea_a)
    for ours, ref in zip(TRITON_OPS["q_precondition"](*args), REFERENCE_OPS["q_precondition"](*args)):
        torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_ghat_recursion_matches_reference(dtype):
    shapes = [(1, 1), (3, 17), (33, 5), (40, 41)]
    make = lambda: [torch.randn(s, dtype=dtype, device=DEVICE) for s in shapes]  # noqa: E731
    v_new, g_hat, v_prev, m = make(), make(), make(), make()
    states = {name: ([t.clone() for t in g_hat], [t.clone() for t in v_prev]) for name in BACKENDS}
    for name, ops in BACKENDS.items():
        ops["ghat_recursion"](v_new, *states[name], m, 0.45)
    for name in ("torch", "triton"):
        for new, prev in zip(v_new, states[name][1]):
            assert torch.equal(prev, new)
    for ours, ref in zip(states["triton"][0], states["torch"][0]):
        torch.testing.assert_close(ours, ref, **TOLERANCE[dtype])
    torch.testing.assert_close(states["torch"][0][1], v_new[1] + 0.45 * (g_hat[1] - v_prev[1] - m[1]))


def opcheck_cases():
    return op_inputs.opcheck_cases(DEVICE)


@pytest.mark.parametrize("op_name", list(opcheck_cases()))
def test_opcheck(op_name):
    """The Triton ops (the reference ops' opcheck, which needs no Triton, is in test_reference_ops.py)."""
    torch.library.opcheck(TRITON_OPS[op_name]._opoverload, opcheck_cases()[op_name])


def test_the_dispatch_point_serves_the_triton_ops():
    assert operations("triton").precondition is TRITON_OPS["precondition"]


def test_batches_beyond_the_grid_limit_take_several_launches(monkeypatch):
    """Grid axis 2 (the batch) holds at most 65,535 programs on CUDA; beyond that the launcher splits."""
    from kldwrm_fast.ops.triton_kernels import gemm

    monkeypatch.setattr(gemm, "MAX_GRID_YZ", 2)
    launches = []
    real = gemm._bmm_kernel.run
    monkeypatch.setattr(gemm._bmm_kernel, "run", lambda *a, **k: launches.append(k["grid"]) or real(*a, **k))
    inputs = preconditioner_inputs(3, 5, torch.float64, (5,))
    expected = REFERENCE_OPS["precondition"](*inputs, 0.01)
    torch.testing.assert_close(TRITON_OPS["precondition"](*inputs, 0.01), expected, **TOLERANCE[torch.float64])
    assert [grid[2] for grid in launches] == [2, 2, 1] * 4  # four GEMMs of P, each in three launches


SIXTY_FOUR_BIT_OFFSETS = """
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from kldwrm_fast.ops import reference
from kldwrm_fast.ops.triton_kernels.factor_update import factor_update
from kldwrm_fast.ops.triton_kernels.gemm import bmm

# 8 GiB of address space, of which the kernel touches three rows: untouched pages cost no memory.
stride = 2**30
storage = torch.empty(2 * stride + 4, dtype=torch.float32)
x = storage.as_strided((3, 4), (stride, 1))
x.copy_(torch.arange(1.0, 13.0).view(3, 4))
ea, ea_reference = torch.eye(4), torch.eye(4)
local = factor_update(x, ea, torch.empty(0), 1 / 3, 0.5, 0.0, False, False)
expected = reference.factor_update(x.clone(), ea_reference, torch.empty(0), 1 / 3, 0.5, 0.0, False, False)
assert torch.allclose(local, expected) and torch.allclose(ea, ea_reference), (local, expected)
a = storage.as_strided((1, 3, 4), (0, stride, 1))  # row 2 starts 2^31 elements in
product = bmm(a, torch.eye(4).unsqueeze(0))
assert torch.equal(product[0], x), product
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's addressing; on a GPU see tests/ops/test_gpu_audit.py")
def test_offsets_past_two_to_the_31_elements_address_the_right_rows():
    """Index × stride products ≥ 2³¹ (large im2col inputs, wide layers) must be formed in 64 bits; in 32 bits
    they wrap and the kernel reads far outside the tensor (a crash or garbage). In a child process, so that a
    crash fails this test rather than the run."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", SIXTY_FOUR_BIT_OFFSETS], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
