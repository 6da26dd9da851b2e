"""On a GPU, the defects the ahead-of-time audit found (issue 14), reproduced where only a GPU shows them:
cuSOLVER's eigenvector layout through the batched preconditioning, float64 accuracy of the compiled Triton
kernels (the CPU interpreter keeps Python floats in double and cannot see 32-bit scalars), batches beyond the
grid limit, offsets past 2³¹ elements, launches on a second device without ``set_device``, and a QE step that
builds its weights without waiting for the stream. Skipped without a CUDA device."""

import copy

import pytest
import torch
from helpers.solver_layout import Model, run

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM
from kldwrm_fast.ops import operations, reference

pytestmark = pytest.mark.gpu


def _backends():
    from kldwrm_fast.ops.backends import unavailable_reason

    return [
        b
        for b in ("triton", "cuda")
        if torch.cuda.is_available() and unavailable_reason(b, torch.device("cuda")) is None
    ]


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_cusolver_eigenvectors_reach_the_batched_preconditioning_untransposed(cls):
    if "cuda" not in _backends():
        pytest.skip("the CUDA extension cannot run here")
    from kldwrm_fast.ops.cuda_ext import eigh

    stack = torch.randn(3, 5, 5, dtype=torch.float64, device="cuda")
    _, vectors, _ = eigh(stack @ stack.mT)
    assert vectors._base is None and vectors.stride() == (25, 1, 5)
    torch.manual_seed(3)
    model = Model().double().cuda()
    batches = [(torch.randn(16, 3, dtype=torch.float64, device="cuda"), torch.randint(0, 8, (16,), device="cuda"))]
    per_block_model = copy.deepcopy(model)
    _, batched = run(cls, model, batches * 3, eigh)
    _, per_block = run(cls, per_block_model, batches * 3, batched=False)
    torch.testing.assert_close(batched, per_block, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float64_kernels_are_accurate_to_float64(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} cannot run here")
    ops = operations(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 70, dtype=torch.float64, device="cuda", generator=g)
    ea, ea_ref = torch.eye(70, dtype=torch.float64, device="cuda"), torch.eye(70, dtype=torch.float64, device="cuda")
    hat, hat_ref = torch.empty_like(ea), torch.empty_like(ea)
    local = ops.factor_update(x, ea, hat, 1 / 3, 0.95, 0.0501, False, True)
    expected = reference.factor_update(x, ea_ref, hat_ref, 1 / 3, 0.95, 0.0501, False, True)
    for ours, ref in ((local, expected), (ea, ea_ref), (hat, hat_ref)):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    q_g, d_g = torch.linalg.eigh(ea_ref[:40, :40])[::-1]
    q_a, d_a = torch.linalg.eigh(ea_ref)[::-1]
    v = torch.randn(40, 70, dtype=torch.float64, device="cuda", generator=g)
    torch.testing.assert_close(
        ops.precondition(q_g, d_g, q_a, d_a, v, 0.0123),
        reference.precondition(q_g, d_g, q_a, d_a, v, 0.0123),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_batches_beyond_65535_blocks_are_split(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} cannot run here")
    batch = 65_535 + 7
    q = torch.eye(2, device="cuda").expand(batch, 2, 2).contiguous()
    d = torch.rand(batch, 2, device="cuda")
    v = torch.randn(batch, 2, 2, device="cuda")
    ours = operations(backend).precondition(q, d, q, d, v, 0.1)
    torch.testing.assert_close(ours, reference.precondition(q, d, q, d, v, 0.1))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_factor_update_of_an_input_with_more_than_two_to_the_31_elements(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} cannot run here")
    n = 16
    rows = 2**31 // n + 1_001
    x = torch.zeros(rows, n, device="cuda")
    x[-1000:] = torch.randn(1000, n, device="cuda")  # only rows past the 2³¹st element are non-zero
    ea = torch.zeros(n, n, device="cuda")
    local = operations(backend).factor_update(x, ea, torch.empty(0, device="cuda"), 1.0, 0.0, 0.0, True, False)
    tail = x[-1000:].double()
    torch.testing.assert_close(local.double(), tail.T @ tail, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_model_on_the_second_device_without_set_device(backend):
    if backend not in _backends():
        pytest.skip(f"{backend} cannot run here")
    torch.manual_seed(3)
    model = Model().cuda(1)
    reference_model = copy.deepcopy(model)
    batches = [(torch.randn(16, 3, device="cuda:1"), torch.randint(0, 8, (16,), device="cuda:1"))] * 3
    assert torch.cuda.current_device() == 0
    ours = run(QKLDWRM, model, batches, backend=backend)[1]
    expected = run(QKLDWRM, reference_model, batches, backend="torch")[1]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_a_qe_wake_objective_is_built_without_a_host_sync():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Model().cuda()
    opt = QEKLDWRM(model, stat_freq=1, inv_freq=1, n_inner=1)
    x, y = torch.randn(16, 3, device="cuda"), torch.randint(0, 8, (16,), device="cuda")
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt._push_snapshot(opt.global_state["step"])
    grads = [torch.zeros(b.shape, device="cuda") for b in opt.curvature.blocks]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        objective = opt.wake_objective(grads, 0.01)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert objective.weights.is_cuda
