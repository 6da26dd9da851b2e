"""The CUDA kernels' block logic (tiles, masks, strides, epilogues, chunk tables), run on the CPU.

``tests/helpers/cuda_emulation/emulate.cpp`` executes the ``__host__ __device__`` phases of ``csrc/tiled_gemm.h`` and
``csrc/ghat_recursion.h`` thread by thread between barriers, in the order ``csrc/kernels.cu`` does, and is
compared here with the PyTorch reference. This needs only g++, so it runs on every machine; the kernels
themselves on a GPU are checked by ``tests/ops/test_cuda_extension.py`` and ``bench/gpu_check.py``.
"""

import ctypes
import pathlib
import shutil
import subprocess

import pytest
import torch

from kldwrm_fast.ops import reference

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE = ROOT / "tests" / "helpers" / "cuda_emulation" / "emulate.cpp"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")

I64 = ctypes.c_int64
PTR = ctypes.c_void_p


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("emulation") / "emulate.so"
    subprocess.run(
        ["g++", "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", str(SOURCE),
         "-o", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    library = ctypes.CDLL(str(out))
    for name, real in (("product_f64", ctypes.c_double), ("product_f32", ctypes.c_float)):
        getattr(library, name).argtypes = [PTR, PTR, PTR, PTR, I64, I64, I64, I64, PTR, real, PTR, I64, PTR, I64, real]
    library.factor_update_f64.argtypes = (
        [PTR, I64, I64, I64, I64, PTR, PTR, PTR] + [ctypes.c_double] * 3 + [ctypes.c_int, I64]
    )
    library.row_chunk_count.restype = I64
    library.row_chunk_count.argtypes = [I64, I64, I64]
    library.rows_per_chunk_default.restype = I64
    library.ghat_f64.argtypes = [ctypes.c_int, PTR, PTR, PTR, PTR, PTR, ctypes.c_double, ctypes.c_int]
    library.ghat_chunk_size.restype = I64
    library.syev_batched_capacity_of.restype = I64
    library.syev_batched_capacity_of.argtypes = [I64]
    return library


def _strides(t):
    return torch.tensor(t.stride(), dtype=torch.int64)


def product(lib, a, b, alpha=1.0, divide=None, damping=0.0):
    """What csrc/kernels.cu's ``product`` computes, from the emulated kernel; a, b are (batch, ., .) views."""
    batch, m, k = a.shape
    n = b.shape[2]
    out = torch.full((batch, m, n), float("nan"), dtype=a.dtype)
    a_strides, b_strides = _strides(a), _strides(b)
    d_row, d_col = divide if divide is not None else (None, None)
    function = lib.product_f64 if a.dtype == torch.float64 else lib.product_f32
    function(
        a.data_ptr(), a_strides.data_ptr(), b.data_ptr(), b_strides.data_ptr(), m, n, k, batch, out.data_ptr(),
        alpha, d_row.data_ptr() if d_row is not None else None, d_row.stride(0) if d_row is not None else 0,
        d_col.data_ptr() if d_col is not None else None, d_col.stride(0) if d_col is not None else 0, damping,
    )  # fmt: skip
    return out


@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (3, 17, 33), (64, 64, 16), (65, 130, 17), (129, 7, 70)])
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (True, False), (False, True), (True, True)])
def test_product_matches_matmul_for_any_strides(lib, m, n, k, transpose_a, transpose_b):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = (
        torch.randn(2, k, m, dtype=torch.float64, generator=g).mT
        if transpose_a
        else torch.randn(2, m, k, generator=g, dtype=torch.float64)
    )
    b = (
        torch.randn(2, n, k, dtype=torch.float64, generator=g).mT
        if transpose_b
        else torch.randn(2, k, n, generator=g, dtype=torch.float64)
    )
    torch.testing.assert_close(product(lib, a, b, alpha=-0.5), -0.5 * a @ b, rtol=1e-13, atol=1e-13)


def test_product_float32_and_shared_batch_operand(lib):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 70, generator=g).expand(3, 40, 70)  # batch stride 0: one factor shared by the batch
    b = torch.randn(3, 70, 33, generator=g)
    expected = (a.double() @ b.double()).float()
    torch.testing.assert_close(product(lib, a, b), expected, rtol=1e-5, atol=1e-5)


def test_damped_division_epilogue(lib):
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(2, 67, 9, generator=g, dtype=torch.float64),
        torch.randn(2, 9, 66, generator=g, dtype=torch.float64),
    )
    d_row, d_col = (
        torch.rand(2, 67, generator=g, dtype=torch.float64),
        torch.rand(2, 66, generator=g, dtype=torch.float64),
    )
    expected = 2.0 * (a @ b) / (d_row[:, :, None] * d_col[:, None, :] + 0.3)
    result = product(lib, a, b, alpha=2.0, divide=(d_row, d_col), damping=0.3)
    torch.testing.assert_close(result, expected, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n_out, n_in", [(1, 1), (3, 5), (65, 17), (10, 129)])
def test_precondition_chain_matches_reference(lib, n_out, n_in):
    """The four products of csrc/kernels.cu's precondition_batched (Q_Γᵀ V, ⊘ fused, Q_Γ ·, · Q_Aᵀ)."""
    g = torch.Generator().manual_seed(n_out + n_in)
    q_g = torch.linalg.qr(torch.randn(2, n_out, n_out, generator=g, dtype=torch.float64))[0]
    q_a = torch.linalg.qr(torch.randn(2, n_in, n_in, generator=g, dtype=torch.float64))[0]
    d_g, d_a = (
        torch.rand(2, n_out, generator=g, dtype=torch.float64),
        torch.rand(2, n_in, generator=g, dtype=torch.float64),
    )
    v = torch.randn(2, n_out, n_in, generator=g, dtype=torch.float64)
    rotated = product(lib, q_g.mT, v)
    scaled = product(lib, rotated, q_a, divide=(d_g, d_a), damping=0.01)
    result = product(lib, product(lib, q_g, scaled), q_a.mT, alpha=-0.1)
    expected = -0.1 * reference.precondition(q_g, d_g, q_a, d_a, v, 0.01)
    torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "rows, n, rows_per_chunk, chunks",
    [
        (1, 1, 4096, 1), (5, 3, 4096, 1), (33, 65, 4096, 1), (130, 129, 4096, 1),
        (100, 5, 16, 7), (96, 5, 16, 6), (33, 65, 16, 3), (1, 5, 16, 1), (130, 70, 32, 5),
    ],
    ids=lambda v: str(v),
)  # fmt: skip
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("with_reweighted", [True, False])
def test_factor_update_matches_reference_and_is_exactly_symmetric(
    lib, rows, n, rows_per_chunk, chunks, first, with_reweighted
):
    """Short chunks (16 rows, the GEMM's depth) force the row-parallel path: a partial last chunk, exact chunks, a
    chunk edge inside the depth loop, several tiles, one row."""
    assert lib.row_chunk_count(rows, n, rows_per_chunk) == chunks
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randn(n, rows, generator=g, dtype=torch.float64).T  # a non-contiguous (rows, n) view
    start = torch.randn(n, n, generator=g, dtype=torch.float64)
    start = start @ start.T
    ea, ea_expected = start.clone(), start.clone()
    hat = torch.full((n, n), float("nan"), dtype=torch.float64) if with_reweighted else None
    hat_expected = torch.empty(n, n, dtype=torch.float64)
    local = torch.full((n, n), float("nan"), dtype=torch.float64)
    lib.factor_update_f64(
        x.data_ptr(), rows, n, x.stride(0), x.stride(1), local.data_ptr(), ea.data_ptr(),
        hat.data_ptr() if hat is not None else None, 1.0 / rows, 0.9, 1.3, int(first), rows_per_chunk,
    )  # fmt: skip
    expected = reference.factor_update(x, ea_expected, hat_expected, 1.0 / rows, 0.9, 1.3, first, with_reweighted)
    torch.testing.assert_close(local, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ea, ea_expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(local, local.T) and torch.equal(ea, ea.T)
    if with_reweighted:
        torch.testing.assert_close(hat, hat_expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(hat, hat.T)


def test_a_convolution_sized_factor_update_is_split_into_enough_chunks(lib):
    """The wide CNN's first layer (262,144 rows, n = 28) would otherwise be one thread block on the whole GPU."""
    assert lib.rows_per_chunk_default() == 4096
    assert lib.row_chunk_count(262144, 28, 4096) == 64
    assert lib.row_chunk_count(4096, 28, 4096) == 1  # few rows: one pass, no workspace
    assert lib.row_chunk_count(10**6, 4096, 4096) == 1  # 2,080 upper tiles already fill the GPU


@pytest.mark.parametrize("width", [1, 4])
def test_ghat_chunk_table_covers_every_element_once(lib, width):
    chunk = lib.ghat_chunk_size()
    # Sizes straddle chunk and vector boundaries; 53 tensors overflow one launch's table (48).
    sizes = [1, 3, 4, chunk, chunk + 1, 2 * chunk + 4, 7] + [5 + 4 * i for i in range(46)]
    g = torch.Generator().manual_seed(2)
    tensors = [[torch.randn(s, generator=g, dtype=torch.float64) for s in sizes] for _ in range(4)]
    v_new, g_hat, v_prev, m = tensors
    g_hat_expected, v_prev_expected = [t.clone() for t in g_hat], [t.clone() for t in v_prev]
    reference.ghat_recursion(v_new, g_hat_expected, v_prev_expected, m, 0.7)

    def pointers(ts):
        return (ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts])

    numel = torch.tensor(sizes, dtype=torch.int64)
    lib.ghat_f64(
        len(sizes), pointers(g_hat), pointers(v_prev), pointers(v_new), pointers(m), numel.data_ptr(), 0.7, width
    )
    for got, want, prev, new in zip(g_hat, g_hat_expected, v_prev, v_new):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
        assert torch.equal(prev, new)


@pytest.mark.parametrize("n", [1, 32, 4096, 4097, 46340, 46341, 100000])
def test_batched_eigensolver_chunks_stay_within_cusolvers_documented_limit(lib, n):
    """cusolverDnXsyevBatched needs n · lda · batch ≤ INT32_MAX: eigh.cpp takes at most this many per call."""
    capacity = lib.syev_batched_capacity_of(n)
    limit = 2**31 - 1
    assert capacity * n * n <= limit < (capacity + 1) * n * n
    if n == 4097:
        assert capacity == 127  # 128 factors of 4097² (the audit's case) take two calls
    if n > 46340:
        assert capacity == 0  # not even one matrix: every one goes through cusolverDnXsyevd
