"""Microbenchmarks of the fused operations and the eigendecomposition, with GB/s, TFLOP/s and (CUDA) peak memory.

Run: ``python -m pytest bench/test_kernels.py --benchmark-only``
"""

import pytest
import torch
from machine import DEVICE, FULL, environment, synchronize

from kldwrm_fast.curvature.eigen import decompose_many
from kldwrm_fast.ops import operations
from kldwrm_fast.ops.backends import IMPLEMENTATIONS, unavailable_reason

BACKENDS = [b for b in IMPLEMENTATIONS if unavailable_reason(b, DEVICE) is None and (FULL or b == "torch")]
FACTOR_SIZES = [33, 257, 1025, 4097] if FULL else [33, 129, 513]
BLOCKS = [(64, 33, 65), (16, 255, 257), (1, 2049, 2049)] if FULL else [(16, 33, 65), (4, 127, 129), (1, 257, 513)]


def spd(batch, n):
    root = torch.randn(batch, n, n + 4, device=DEVICE) / (n + 4) ** 0.5
    product = root @ root.mT
    return 0.5 * (product + product.mT)


def report(benchmark, n_bytes, flops):
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(environment())
    benchmark.extra_info["GB/s"] = n_bytes / seconds / 1e9
    benchmark.extra_info["TFLOP/s"] = flops / seconds / 1e12


def run(benchmark, fn):
    def timed():
        fn()
        synchronize()

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed()
    benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", FACTOR_SIZES)
def test_factor_update(benchmark, backend, n):
    rows = 4096
    ops = operations(backend)
    x, ea = torch.randn(rows, n, device=DEVICE), spd(1, n)[0]
    hat = torch.empty_like(ea)
    benchmark.group = "factor_update"
    run(benchmark, lambda: ops.factor_update(x, ea, hat, 1.0 / rows, 0.95, 0.06, False, True))
    report(benchmark, 4 * (rows * n + 4 * n * n), 2 * rows * n * n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", BLOCKS, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_precondition(benchmark, backend, shape):
    batch, n_out, n_in = shape
    ops = operations(backend)
    d_g, q_g = torch.linalg.eigh(spd(batch, n_out))
    d_a, q_a = torch.linalg.eigh(spd(batch, n_in))
    v = torch.randn(batch, n_out, n_in, device=DEVICE)
    benchmark.group = "precondition"
    run(benchmark, lambda: ops.precondition(q_g, d_g, q_a, d_a, v, 0.01))
    elements = batch * (n_out * n_out + n_in * n_in + 2 * n_out * n_in)
    report(benchmark, 4 * elements, 4 * batch * (n_out * n_out * n_in + n_out * n_in * n_in))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ghat_recursion(benchmark, backend):
    ops = operations(backend)
    shapes = [(2048, 2049), (2048, 2049), (10, 2049)] if FULL else [(256, 257), (256, 257), (10, 257)]
    lists = [[torch.randn(s, device=DEVICE) for s in shapes] for _ in range(4)]
    benchmark.group = "ghat_recursion"
    run(benchmark, lambda: ops.ghat_recursion(*lists, 0.5))
    total = sum(a * b for a, b in shapes)
    report(benchmark, 4 * 6 * total, 4 * total)


EIGEN_SOLVERS = ["torch"] + (["cusolver"] if "cuda" in BACKENDS else [])


@pytest.mark.parametrize("solver", EIGEN_SOLVERS)
@pytest.mark.parametrize("batch,n", [(64, 33), (16, 257), (1, 2049)] if FULL else [(16, 33), (4, 129), (1, 513)])
def test_eigendecomposition(benchmark, solver, batch, n):
    """What an inverse step does for ``batch`` due factors of size ``n``: grouped, batched, one host check."""
    requests = [(matrix, None, "factor") for matrix in spd(batch, n)]
    batched = operations("cuda").eigh if solver == "cusolver" else None
    benchmark.group = "eigendecomposition"
    run(benchmark, lambda: decompose_many(requests, batched))
    report(benchmark, 4 * 2 * batch * n * n, 9 * batch * n**3)
