"""One-run GPU check of the fused operations: accuracy against float64, time, GB/s and TFLOP/s.

On a CUDA machine (after ``pip install --no-build-isolation --no-deps -e .`` so that a CUDA extension, when
present, is built), run ``python bench/gpu_check.py``: it measures the copy bandwidth and float32 GEMM rate
first, then checks every operation on every available backend against a float64 reference on realistic
shapes (factors from 33 to 4097, odd sizes, batches of equal-shape blocks) and times each with CUDA events
(warm-up, median), printing one table. A second table checks the eigensolvers on the factors an inverse
step decomposes (batches of 16–64 factors of sizes 32–512, single factors up to 4097): cuSOLVER through the
CUDA extension (``XsyevBatched`` for batches, ``Xsyevd`` for one), ``torch.linalg.eigh`` on the GPU, and
``torch.linalg.eigh`` on the host CPU including both transfers, with the residual ``‖AQ − QΛ‖/‖A‖`` and
``‖QᵀQ − I‖``. ``--smoke`` runs tiny shapes on any device (CPU included, Triton through its interpreter) so
the script itself is tested in CI. ``--tune FILE`` also writes the dispatch table measured here: per operation
and size class (:mod:`kldwrm_fast.ops.routing`), the backend with the least time summed over the cases
of that class; ``KLDWRM_DISPATCH_TABLE=FILE`` then makes ``backend="auto"`` use it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from kldwrm_fast.ops import backends as dispatch
from kldwrm_fast.ops import routing as dispatch_table


@dataclass
class Row:
    op: str
    shape: str
    backend: str
    rel_error: float
    ms: float
    gb_per_s: float
    tflop_per_s: float


def timed(fn, device: torch.device, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def ceilings(device: torch.device, smoke: bool) -> dict:
    """Measured copy bandwidth (GB/s, read + write) and float32 GEMM rate (TFLOP/s, no TF32)."""
    n_copy = 1 << (16 if smoke else 28)
    src = torch.randn(n_copy, device=device)
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src), device, 3, 10)
    n = 256 if smoke else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    gemm_ms = timed(lambda: a @ b, device, 3, 10)
    torch.backends.cuda.matmul.allow_tf32 = previous
    return {"copy_gb_s": 2 * 4 * n_copy / copy_ms / 1e6, "gemm_tflop_s": 2 * n**3 / gemm_ms / 1e9}


def spd(batch: int, n: int, device) -> torch.Tensor:
    root = torch.randn(batch, n, n + 8, device=device, dtype=torch.float64) / (n + 8) ** 0.5
    product = root @ root.mT
    return (0.5 * (product + product.mT)).float()


def eigh(matrix: torch.Tensor):
    values, vectors = torch.linalg.eigh(matrix.double())
    return vectors.float(), values.clamp_min(0).float()


def relative_error(out, ref) -> float:
    outs = out if isinstance(out, (tuple, list)) else [out]
    refs = ref if isinstance(ref, (tuple, list)) else [ref]
    num = sum(float((o.double() - r.double()).norm() ** 2) for o, r in zip(outs, refs))
    den = sum(float(r.double().norm() ** 2) for r in refs)
    return (num / max(den, 1e-300)) ** 0.5


def upcast(args):
    def wide(a):
        if isinstance(a, list):
            return [t.double() for t in a]
        return a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    return tuple(wide(a) for a in args)


def cases(device, smoke: bool):
    """(op name, shape label, args builder, bytes, flops) for every case."""
    factor_sizes = [3, 17, 33] if smoke else [33, 257, 1025, 4097]
    rows = 64 if smoke else 8192
    for n, layout in itertools.product(factor_sizes, ("row-major", "feature-major")):

        def build(n=n, layout=layout):  # a convolution's rows are feature-major (curvature/layers.py)
            feature_major = layout == "feature-major"
            x = torch.randn(*((n, rows) if feature_major else (rows, n)), device=device)
            x = x.T if feature_major else x
            ea = spd(1, n, device)[0]
            return (x, ea, torch.empty_like(ea), 1.0 / rows, 0.95, 0.06, False, True)

        yield "factor_update", f"rows={rows} n={n} {layout}", build, 4 * (rows * n + 4 * n * n), 2 * rows * n * n
    shapes = [(2, 3, 5), (1, 17, 33)] if smoke else [(64, 33, 65), (16, 255, 257), (4, 513, 1025), (1, 4097, 4097)]
    for batch, n_out, n_in in shapes:

        def build_p(batch=batch, n_out=n_out, n_in=n_in):
            q_g, d_g = eigh(spd(batch, n_out, device))
            q_a, d_a = eigh(spd(batch, n_in, device))
            v = torch.randn(batch, n_out, n_in, device=device)
            return q_g, d_g, q_a, d_a, v

        label = f"{batch}x({n_out}x{n_in})"
        gemm = 2 * batch * (n_out * n_out * n_in + n_out * n_in * n_in)
        elements = batch * (n_out * n_out + n_in * n_in + 2 * n_out * n_in)
        yield "precondition", label, lambda b=build_p: (*b(), 0.01), 4 * elements, 2 * gemm

        def build_q(b=build_p, batch=batch, n_out=n_out, n_in=n_in):
            q_g, d_g, q_a, d_a, g_hat = b()
            return q_g, d_g, q_a, d_a, g_hat, 0.01, 0.01, spd(batch, n_out, device), spd(batch, n_in, device)

        extra = batch * (n_out * n_out + n_in * n_in + n_out * n_in)
        yield "q_precondition", label, build_q, 4 * (elements + extra), 3 * gemm
    sizes = [(5, 7), (33, 3)] if smoke else [(30, 113), (4097, 4097), (2048, 2049), (10, 2049)]

    def build_g():
        lists = [[torch.randn(s, device=device) for s in sizes] for _ in range(4)]
        return (*lists, 0.5)

    total = sum(a * b for a, b in sizes)
    yield "ghat_recursion", f"{len(sizes)} tensors, {total} elems", build_g, 4 * 6 * total, 4 * total


def fresh(args):
    """Copies of every tensor argument (mutating ops must not change the inputs other runs see)."""
    return tuple(
        a.clone() if isinstance(a, torch.Tensor) else [t.clone() for t in a] if isinstance(a, list) else a for a in args
    )


def run_case(ops, name, args):
    """Run one op on copies of its inputs; return what it produced."""
    args = fresh(args)
    out = getattr(ops, name)(*args)
    if name == "factor_update":
        return out, args[1], args[2]
    if name == "ghat_recursion":
        return args[1] + args[2]
    return out


@dataclass
class EigenRow:
    shape: str
    solver: str
    residual: float
    orthogonality: float
    ms: float


def eigen_solvers(device: torch.device, backends: list[str]) -> dict:
    """Batched solvers by name: ``stack -> (values, vectors)`` on ``device``."""
    solvers = {}
    if "cuda" in backends:
        from kldwrm_fast.ops.cuda_ext import eigh as cusolver

        solvers["cusolver"] = lambda a: cusolver(a)[:2]
    solvers[f"torch-{device.type}"] = torch.linalg.eigh
    if device.type == "cuda":
        solvers["host+copies"] = lambda a: [t.to(device) for t in torch.linalg.eigh(a.cpu())]
    return solvers


def eigen_rows(device: torch.device, backends: list[str], smoke: bool) -> list[EigenRow]:
    """Accuracy and median time of every eigensolver on batches and single factors (float32)."""
    if smoke:
        shapes = [(4, 5), (1, 7)]
    else:
        batched = [(64, 32), (64, 33), (64, 64), (16, 128), (64, 128), (16, 256), (64, 256), (16, 512), (64, 512)]
        shapes = batched + [(1, 16), (1, 128), (1, 512), (1, 2048), (1, 4097)]
    rows = []
    for batch, n in shapes:
        matrix = spd(batch, n, device)
        wide = matrix.double()
        eye = torch.eye(n, dtype=torch.float64, device=device)
        for name, solver in eigen_solvers(device, backends).items():
            values, vectors = (t.double() for t in solver(matrix))
            residual = torch.linalg.matrix_norm(
                wide @ vectors - vectors * values[:, None, :]
            ) / torch.linalg.matrix_norm(wide)
            orthogonality = torch.linalg.matrix_norm(vectors.mT @ vectors - eye)
            repeat = 3 if n >= 2048 or (batch * n >= 64 * 256) else 10
            ms = timed(lambda: solver(matrix), device, 1, 1 if smoke else repeat)
            rows.append(EigenRow(f"{batch}x{n}", name, float(residual.max()), float(orthogonality.max()), ms))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (CI check of this script)")
    parser.add_argument("--json", help="also write the rows and ceilings to this file")
    parser.add_argument("--tune", help="also write the measured dispatch table (JSON) to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu_check: no CUDA device; use --smoke for a CPU run of the script itself")
    backends = [b for b in dispatch.IMPLEMENTATIONS if dispatch.unavailable_reason(b, device) is None]
    limits = ceilings(device, args.smoke)
    warmup, repeat = (1, 2) if args.smoke else (5, 25)
    rows = []
    timings: dict = {}  # (operation, size class) -> {backend: summed ms}
    for name, label, build, n_bytes, flops in cases(device, args.smoke):
        inputs = build()
        size = dispatch_table.size_class(name, inputs)
        reference = run_case(dispatch.operations("torch"), name, upcast(inputs))
        for backend in backends:
            op = getattr(dispatch.operations(backend), name)
            error = relative_error(run_case(dispatch.operations(backend), name, inputs), reference)
            scratch = fresh(inputs)
            ms = timed(lambda: op(*scratch), device, warmup, repeat)  # mutating ops update their own copies
            rows.append(Row(name, label, backend, error, ms, n_bytes / ms / 1e6, flops / ms / 1e9))
            per_backend = timings.setdefault((name, size), {})
            per_backend[backend] = per_backend.get(backend, 0.0) + ms
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}; cuda {torch.version.cuda}; backends: {', '.join(backends)}")
    print(f"ceilings: copy {limits['copy_gb_s']:.0f} GB/s, fp32 GEMM {limits['gemm_tflop_s']:.1f} TFLOP/s")
    print(
        f"{'op':<15} {'shape':<32} {'backend':<7} {'rel err':>9} {'ms':>9} {'GB/s':>8} {'%copy':>6} "
        f"{'TFLOP/s':>8} {'%gemm':>6}"
    )
    for r in rows:
        print(
            f"{r.op:<15} {r.shape:<32} {r.backend:<7} {r.rel_error:>9.2e} {r.ms:>9.3f} {r.gb_per_s:>8.1f} "
            f"{100 * r.gb_per_s / limits['copy_gb_s']:>6.1f} {r.tflop_per_s:>8.2f} "
            f"{100 * r.tflop_per_s / limits['gemm_tflop_s']:>6.1f}"
        )
    eigen = eigen_rows(device, backends, args.smoke)
    print(f"\n{'eigh (float32)':<15} {'solver':<12} {'‖AQ−QΛ‖/‖A‖':>12} {'‖QᵀQ−I‖':>9} {'ms':>9} {'vs torch':>8}")
    torch_ms = {r.shape: r.ms for r in eigen if r.solver.startswith("torch-")}
    for r in eigen:
        print(
            f"{r.shape:<15} {r.solver:<12} {r.residual:>12.2e} {r.orthogonality:>9.2e} {r.ms:>9.3f} "
            f"{torch_ms[r.shape] / r.ms:>7.1f}×"
        )
    if args.tune:
        table: dict = {}
        for (name, size), per_backend in sorted(timings.items()):
            table.setdefault(name, {})[size] = min(per_backend, key=per_backend.get)
        dispatch_table.validated(table, args.tune)
        with open(args.tune, "w") as handle:
            json.dump(table, handle, indent=1, sort_keys=True)
        print(f"\ndispatch table measured here (KLDWRM_DISPATCH_TABLE={args.tune}):", json.dumps(table, sort_keys=True))
    if args.json:
        with open(args.json, "w") as handle:
            record = {"device": gpu, "ceilings": limits, "rows": [asdict(r) for r in rows]}
            json.dump({**record, "eigh": [asdict(r) for r in eigen]}, handle, indent=1)
    worst = max([r.rel_error for r in rows] + [r.residual for r in eigen] + [r.orthogonality for r in eigen])
    if worst > 1e-3 or worst != worst:
        sys.exit(f"gpu_check: relative error or eigen residual {worst:.2e} exceeds 1e-3")


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    main()
