"""The CUDA extension ``kldwrm_fast._C``: build, import and registration everywhere; kernels on a GPU.

Without a built extension the build checks skip, unless ``KLDWRM_REQUIRE_CUDA_EXTENSION=1`` (CI sets it after
compiling the extension), which turns a missing or unloadable extension into a failure. Tests marked ``gpu``
run each CUDA operation against the PyTorch reference on odd shapes, the cuSOLVER eigensolver, and whole
optimizer trajectories with ``backend="cuda"`` against ``backend="torch"``.
"""

import copy
import importlib.util
import os
import sys

import pytest
import torch
from helpers.matrices import spd
from helpers.trajectories import model_and_batches, trajectory

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature import eigen
from kldwrm_fast.ops import backends, dispatch, reference
from kldwrm_fast.ops.library import REFERENCE_OPS

NAMES = ("factor_update", "precondition", "q_precondition", "ghat_recursion")
REQUIRED = os.environ.get("KLDWRM_REQUIRE_CUDA_EXTENSION") == "1"


@pytest.fixture(scope="module")
def cuda_ext():
    if importlib.util.find_spec("kldwrm_fast._C") is None:
        if REQUIRED:
            pytest.fail("KLDWRM_REQUIRE_CUDA_EXTENSION=1 but kldwrm_fast._C was not built")
        pytest.skip("the CUDA extension is not built here (pip install --no-build-isolation -e . with CUDA torch)")
    try:
        from kldwrm_fast.ops import cuda_ext
    except ImportError as error:  # e.g. built against another torch than the one running
        if REQUIRED:
            raise
        pytest.skip(f"the CUDA extension is built but cannot be loaded here: {error}")
    return cuda_ext


def test_extension_registers_every_operation_for_cuda_with_the_reference_schema(cuda_ext):
    for name in NAMES:
        ours = getattr(torch.ops.kldwrm_fast, f"{name}_cuda").default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(ours.name(), "CUDA")
        expected = str(REFERENCE_OPS[name]._opoverload._schema).replace(f"::{name}(", f"::{name}_cuda(")
        assert str(ours._schema) == expected
    eigh = torch.ops.kldwrm_fast.eigh_cuda.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(eigh.name(), "CUDA")
    assert set(cuda_ext.CUDA_OPS) == set(NAMES)


def test_fake_implementations_give_shapes_without_running(cuda_ext):
    meta = dict(device="meta")
    q_g, d_g, q_a, d_a = (
        torch.empty(3, 5, 5, **meta),
        torch.empty(3, 5, **meta),
        torch.empty(3, 7, 7, **meta),
        torch.empty(3, 7, **meta),
    )
    v = torch.empty(3, 5, 7, **meta)
    assert cuda_ext.CUDA_OPS["precondition"](q_g, d_g, q_a, d_a, v, 0.1).shape == (3, 5, 7)
    step, product = cuda_ext.CUDA_OPS["q_precondition"](q_g, d_g, q_a, d_a, v, 0.1, 0.5, q_g, q_a)
    assert step.shape == product.shape == (3, 5, 7)
    values, vectors, info = cuda_ext.eigh(torch.empty(4, 6, 6, **meta))
    assert values.shape == (4, 6) and vectors.shape == (4, 6, 6) and info.shape == (4,) and info.dtype == torch.int32


def test_cuda_backend_is_refused_on_cpu_tensors_with_a_reason():
    assert "CUDA tensors only" in backends.unavailable_reason("cuda", torch.device("cpu"))
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_an_unloadable_extension_becomes_a_reason_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "kldwrm_fast._C", None)  # makes `import kldwrm_fast._C` raise ImportError
    monkeypatch.delitem(sys.modules, "kldwrm_fast.ops.cuda_ext", raising=False)
    backends._cuda_extension_fault.cache_clear()
    try:
        reason = backends._cuda_extension_fault("cuda:0")
    finally:
        backends._cuda_extension_fault.cache_clear()
    assert reason.startswith("the CUDA extension kldwrm_fast._C cannot run on cuda:0")


# --- on a GPU ----------------------------------------------------------------------------------------------


def _cuda(*tensors):
    return [t.cuda() for t in tensors]


def _tolerance(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, n", [(1, 1), (7, 3), (33, 65), (300, 129)])
@pytest.mark.parametrize("first, with_reweighted", [(True, True), (False, True), (False, False)])
def test_factor_update_matches_reference(cuda_ext, dtype, rows, n, first, with_reweighted):
    g = torch.Generator().manual_seed(rows * n)
    x = torch.randn(n, rows, generator=g, dtype=dtype).T
    start = torch.randn(n, n, generator=g, dtype=dtype)
    ea = start @ start.T
    hat = torch.zeros(n, n, dtype=dtype)
    ea_ref, hat_ref = ea.clone(), hat.clone()
    local_ref = reference.factor_update(x, ea_ref, hat_ref, 1 / rows, 0.95, 1.2, first, with_reweighted)
    x_c, ea_c, hat_c = _cuda(x, ea, hat)
    local = cuda_ext.CUDA_OPS["factor_update"](x_c, ea_c, hat_c, 1 / rows, 0.95, 1.2, first, with_reweighted)
    torch.testing.assert_close(local.cpu(), local_ref, **_tolerance(dtype))
    torch.testing.assert_close(ea_c.cpu(), ea_ref, **_tolerance(dtype))
    assert torch.equal(ea_c, ea_c.T) and torch.equal(local, local.T)
    if with_reweighted:
        torch.testing.assert_close(hat_c.cpu(), hat_ref, **_tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, n", [(262144, 28), (20000, 65), (9000, 3)])  # 64, 5 and 3 row chunks
@pytest.mark.parametrize("feature_major", [False, True], ids=["row-major", "feature-major"])  # a convolution's rows
def test_the_row_parallel_factor_update_matches_reference_and_repeats_bit_for_bit(
    cuda_ext, dtype, rows, n, feature_major
):
    g = torch.Generator().manual_seed(rows + n)
    x = (
        torch.randn(n, rows, generator=g, dtype=dtype).T
        if feature_major
        else torch.randn(rows, n, generator=g, dtype=dtype)
    )
    ea = torch.eye(n, dtype=dtype)
    ea_ref = ea.clone()
    local_ref = reference.factor_update(x, ea_ref, torch.empty(0, dtype=dtype), 1 / rows, 0.95, 0.0, False, False)
    x_c = x.cuda()
    runs = []
    for _ in range(2):
        ea_c = ea.cuda()
        local = cuda_ext.CUDA_OPS["factor_update"](x_c, ea_c, torch.empty(0, device="cuda", dtype=dtype), 1 / rows,
                                                    0.95, 0.0, False, False)  # fmt: skip
        runs.append((local, ea_c))
    torch.testing.assert_close(runs[0][0].cpu(), local_ref, **_tolerance(dtype))
    torch.testing.assert_close(runs[0][1].cpu(), ea_ref, **_tolerance(dtype))
    assert torch.equal(runs[0][0], runs[0][0].T)
    assert all(torch.equal(a, b) for a, b in zip(*runs))  # no atomics: the same sum every time


def _eigen_inputs(batch, n_out, n_in, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch,) if batch else ()
    q_g = torch.linalg.qr(torch.randn(*shape, n_out, n_out, generator=g, dtype=torch.float64))[0].to(dtype)
    q_a = torch.linalg.qr(torch.randn(*shape, n_in, n_in, generator=g, dtype=torch.float64))[0].to(dtype)
    d_g, d_a = (
        torch.rand(*shape, n_out, generator=g, dtype=dtype),
        torch.rand(*shape, n_in, generator=g, dtype=dtype),
    )
    v = torch.randn(*shape, n_out, n_in, generator=g, dtype=dtype)
    ea_g, ea_a = (
        torch.randn(*shape, n_out, n_out, generator=g, dtype=dtype),
        torch.randn(*shape, n_in, n_in, generator=g, dtype=dtype),
    )
    return q_g, d_g, q_a, d_a, v, ea_g, ea_a


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, n_out, n_in", [(0, 1, 1), (0, 10, 785), (3, 65, 17), (2, 129, 130)])
def test_precondition_and_q_precondition_match_reference(cuda_ext, dtype, batch, n_out, n_in):
    q_g, d_g, q_a, d_a, v, ea_g, ea_a = _eigen_inputs(batch, n_out, n_in, dtype, n_out + n_in)
    inputs = _cuda(q_g, d_g, q_a, d_a, v)
    expected = reference.precondition(q_g, d_g, q_a, d_a, v, 0.01)
    torch.testing.assert_close(cuda_ext.CUDA_OPS["precondition"](*inputs, 0.01).cpu(), expected, **_tolerance(dtype))
    step_ref, product_ref = reference.q_precondition(q_g, d_g, q_a, d_a, v, 0.01, 0.3, ea_g, ea_a)
    step, product = cuda_ext.CUDA_OPS["q_precondition"](*inputs, 0.01, 0.3, *_cuda(ea_g, ea_a))
    torch.testing.assert_close(step.cpu(), step_ref, **_tolerance(dtype))
    torch.testing.assert_close(product.cpu(), product_ref, **_tolerance(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ghat_recursion_matches_reference_across_chunks_and_tables(cuda_ext, dtype):
    sizes = [1, 3, 4, 16384, 16385, 40001, (7, 9), (64, 785)] + [5 + 4 * i for i in range(50)]
    g = torch.Generator().manual_seed(3)
    quads = [
        [torch.randn(s if isinstance(s, tuple) else (s,), generator=g, dtype=dtype) for s in sizes] for _ in range(4)
    ]
    v_new, g_hat, v_prev, m = quads
    g_ref, prev_ref = [t.clone() for t in g_hat], [t.clone() for t in v_prev]
    reference.ghat_recursion(v_new, g_ref, prev_ref, m, 0.6)
    g_c, prev_c = [t.cuda() for t in g_hat], [t.cuda() for t in v_prev]
    m_c = [t.cuda() for t in m]
    m_c[6] = m_c[6].T.contiguous().T  # a non-contiguous read-only input
    cuda_ext.CUDA_OPS["ghat_recursion"]([t.cuda() for t in v_new], g_c, prev_c, m_c, 0.6)
    for got, want, prev, new in zip(g_c, g_ref, prev_c, v_new):
        torch.testing.assert_close(got.cpu(), want, **_tolerance(dtype))
        assert torch.equal(prev.cpu(), new)


@pytest.mark.gpu
def test_argument_errors_name_the_tensor(cuda_ext):
    x = torch.randn(5, 4, device="cuda")
    ea = torch.zeros(4, 8, device="cuda")[:, :4]
    with pytest.raises(RuntimeError, match="ea must be contiguous"):
        cuda_ext.CUDA_OPS["factor_update"](x, ea, ea, 0.2, 0.9, 1.0, True, False)
    q, d, v = torch.eye(3, device="cuda"), torch.ones(3, device="cuda"), torch.ones(3, 4, device="cuda")
    with pytest.raises(RuntimeError, match=r"q_a must have shape \[4, 4\]"):
        cuda_ext.CUDA_OPS["precondition"](q, d, q, d, v, 0.1)
    with pytest.raises(RuntimeError, match="d_g must have dtype"):
        cuda_ext.CUDA_OPS["precondition"](q, d.double(), q, d, torch.ones(3, 3, device="cuda"), 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, n", [(1, 5), (1, 300), (16, 33), (40, 128), (3, 513)])
def test_cusolver_eigh_is_accurate(cuda_ext, dtype, batch, n):
    a = spd(n, dtype, (batch,), "cuda", torch.Generator().manual_seed(batch + n))
    values, vectors, info = cuda_ext.eigh(a)
    assert (info == 0).all()
    scale = torch.linalg.matrix_norm(a).double()
    residual = torch.linalg.matrix_norm(a.double() @ vectors.double() - vectors.double() * values.double()[:, None, :])
    eye = torch.eye(n, dtype=torch.float64, device="cuda")
    orthogonality = torch.linalg.matrix_norm(vectors.double().mT @ vectors.double() - eye)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert (residual / scale).max() < tolerance * n**0.5
    assert orthogonality.max() < tolerance * n
    assert (values[:, 1:] >= values[:, :-1]).all()


@pytest.mark.gpu
def test_cusolver_reports_failure_on_the_device_and_the_ladder_recovers(cuda_ext):
    good = torch.eye(6, device="cuda") * 2
    bad = good.clone()
    bad[0, 0] = float("nan")
    previous = (torch.eye(6, device="cuda"), torch.ones(6, device="cuda"))
    with pytest.warns(RuntimeWarning, match="keeping the previous"):
        results = eigen.decompose_many([(good, None, "good"), (bad, previous, "bad")], cuda_ext.eigh)
    assert results[1] is previous
    torch.testing.assert_close(results[0][1], torch.full((6,), 2.0, device="cuda"))


@pytest.mark.gpu
def test_auto_routes_each_call_by_the_dispatch_table_and_follows_the_torch_trajectory(cuda_ext):
    model, batches = model_and_batches(width=70, device="cuda", dtype=torch.float64)
    reference_params, _ = trajectory(QKLDWRM, "torch", copy.deepcopy(model), batches)
    ours, opt = trajectory(QKLDWRM, "auto", model, batches)
    assert opt.backend == "cuda" and opt._ops.backend.startswith("auto(cuda")
    for a, b in zip(ours, reference_params):
        assert (a - b).norm() <= 1e-9 * b.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("curvature_sum", ["reweighted", "exact"])
def test_cuda_backend_follows_the_torch_trajectory(cuda_ext, cls, dtype, curvature_sum):
    if curvature_sum == "exact" and cls not in (QKLDWRM, QEKLDWRM):
        pytest.skip("curvature_sum is an option of Q and QE")
    extra = dict(n_inner=2) if cls is QEKLDWRM else {}
    extra.update(curvature_sum=curvature_sum) if cls in (QKLDWRM, QEKLDWRM) else None
    model, batches = model_and_batches(width=70, device="cuda", dtype=dtype)  # 70 > one 64-wide kernel tile
    reference_params, _ = trajectory(cls, "torch", copy.deepcopy(model), batches, **extra)
    ours, opt = trajectory(cls, "cuda", model, batches, **extra)
    assert opt.backend == "cuda"
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    for a, b in zip(ours, reference_params):
        assert (a - b).norm() <= tolerance * b.norm()


@pytest.mark.gpu
def test_opcheck_passes_for_every_cuda_operation(cuda_ext):
    q_g, d_g, q_a, d_a, v, ea_g, ea_a = _cuda(*_eigen_inputs(2, 5, 7, torch.float32, 0))
    x, ea = torch.randn(9, 7, device="cuda"), torch.eye(7, device="cuda")
    samples = {
        "factor_update": (x, ea, torch.empty_like(ea), 1 / 9, 0.9, 1.1, False, True),
        "precondition": (q_g, d_g, q_a, d_a, v, 0.1),
        "q_precondition": (q_g, d_g, q_a, d_a, v, 0.1, 0.5, ea_g, ea_a),
        "ghat_recursion": ([v[0].clone()], [v[1].clone()], [v[0].clone()], [v[1].clone()], 0.5),
    }
    for name, args in samples.items():
        torch.library.opcheck(cuda_ext.CUDA_OPS[name], args)
    torch.library.opcheck(torch.ops.kldwrm_fast.eigh_cuda.default, (ea_g @ ea_g.mT,))
