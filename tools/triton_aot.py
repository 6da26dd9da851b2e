"""Ahead-of-time gate for the Triton kernels: compile every configuration the launchers select for real
NVIDIA targets, on a machine without a GPU, and check what only compilation shows.

A stand-in Triton driver reports the target (``GPUTarget("cuda", arch, 32)``) and every ``kernel[grid](...)``
launch is turned into Triton's warm-up (compile, do not run), so the package's own launch code
(:mod:`kldwrm_fast.ops.triton_kernels`) picks tile sizes, dtypes and constexprs exactly as it would on a GPU.
Each cubin Triton built (its own ``ptxas`` run for the target) is read with Triton's bundled ``cuobjdump
-res-usage``; the PTX gives the parameter types. The gate fails on:

- a configuration that does not compile;
- spilled registers (a non-zero stack frame or local memory);
- shared memory above the target's per-block limit;
- a float64 kernel whose floating-point scalar parameters are not 64-bit (``.param .f32`` in its PTX).

Usage: ``python tools/triton_aot.py [--arch 90 --arch 80] [--json FILE] [--tune]``; prints one table, exits
1 on a failure. ``--tune`` first rewrites the launchers' warp table
(``kldwrm_fast/ops/triton_kernels/warps.json``) for the installed Triton release and the targets given (other
targets' and releases' entries stay) with, per configuration and target, the first warp count that compiles
without spills; run it after changing a kernel, with each Triton release the table holds (the GPU machines' and
CI's), and commit the table. Must run without
``TRITON_INTERPRET`` (the interpreter has no compiler to judge).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
"""Largest shared memory one block may use (bytes, opt-in), per compute capability (CUDA C Programming Guide,
"Technical Specifications per Compute Capability")."""


@dataclass
class Compiled:
    kernel: str
    arch: int
    config: str
    dtype: str
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    scalar_params: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class AheadOfTimeDriver:
    """The part of Triton's driver interface the JIT needs to compile for ``arch`` without a device."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # one kernel cache per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int, sink: list):
    """Within the block, Triton launches compile for ``arch`` and append ``(JITFunction, CompiledKernel, tiles,
    warps)`` (``tiles``: the launch's block-size constexprs, in order)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        tiles = tuple(v for k, v in kwargs.items() if k.startswith("BLOCK"))
        sink.append((self, kernel, tiles, kwargs.get("num_warps", 4)))
        return kernel

    from kldwrm_fast.ops.triton_kernels import common

    JITFunction.run = run
    previous = getattr(driver, "_active", None)  # reading driver.active would look for a real GPU
    driver.set_active(AheadOfTimeDriver(arch))
    target_arch = common.target_arch
    common.target_arch = lambda tensor: str(arch)  # the launchers' warp table is read for this target
    try:
        yield
    finally:
        JITFunction.run = original
        driver._active = previous
        common.target_arch = target_arch


def launches():
    """``(description, dtype, thunk)`` for every configuration the launchers can select.

    Sizes are chosen to reach every tile choice of :func:`kldwrm_fast.ops.triton_kernels.common.tile`
    (16, 32, 64 along each edge; 16 and 32 along the reduction), contiguous and transposed operands, both
    values of every constexpr flag, aligned and unaligned element counts.
    """
    import torch

    from kldwrm_fast.ops.triton_kernels.factor_update import factor_update
    from kldwrm_fast.ops.triton_kernels.ghat import ghat_recursion
    from kldwrm_fast.ops.triton_kernels.precondition import precondition, q_precondition

    sizes = (5, 20, 100)
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).removeprefix("torch.")
        # 5000 rows split into chunks for every n here (kldwrm_fast.ops.triton_kernels.factor_update.row_chunks).
        for n, rows, first, hat in itertools.product(sizes, (5, 40, 5000), (True, False), (True, False)):
            x = torch.ones(rows, n, dtype=dtype)
            ea, hat_out = torch.zeros(n, n, dtype=dtype), torch.zeros(n, n, dtype=dtype)
            yield (
                f"factor_update n={n} rows={rows} first={first} reweighted={hat}",
                name,
                lambda x=x, ea=ea, out=hat_out, f=first, h=hat: factor_update(x, ea, out, 0.5, 0.9, 0.2, f, h),
            )
        # a convolution's rows are feature-major (unit stride along the rows), a separate specialisation
        for n, rows in itertools.product(sizes, (40, 5000)):
            x = torch.ones(n, rows, dtype=dtype).T
            ea, hat_out = torch.zeros(n, n, dtype=dtype), torch.zeros(n, n, dtype=dtype)
            yield (
                f"factor_update n={n} rows={rows} feature-major",
                name,
                lambda x=x, ea=ea, out=hat_out: factor_update(x, ea, out, 0.5, 0.9, 0.2, False, True),
            )
        for n_out, n_in in itertools.product(sizes, sizes):
            q_g, q_a = torch.eye(n_out, dtype=dtype), torch.eye(n_in, dtype=dtype)
            d_g, d_a = torch.ones(n_out, dtype=dtype), torch.ones(n_in, dtype=dtype)
            v = torch.ones(2, n_out, n_in, dtype=dtype)
            batch = [t.expand(2, *t.shape).contiguous() for t in (q_g, d_g, q_a, d_a)]
            yield (
                f"precondition {n_out}x{n_in}",
                name,
                lambda b=batch, v=v: precondition(*b, v, 0.01),
            )
            yield (
                f"q_precondition {n_out}x{n_in}",
                name,
                lambda b=batch, v=v: q_precondition(*b, v, 0.01, 0.1, b[0], b[2]),
            )
        for numel in (1000, 1024):
            tensors = [torch.ones(numel, dtype=dtype) for _ in range(4)]
            yield (
                f"ghat_recursion numel={numel}",
                name,
                lambda t=tensors: ghat_recursion([t[0]], [t[1]], [t[2]], [t[3]], 0.5),
            )


ENTRY_PARAM = re.compile(r"\.param\s+\.(f16|f32|f64|b16|b32|b64|u32|u64|s32|s64|u8|u16|pred)(?!\s+\.ptr)\s+(\w+)")
RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def scalar_params(ptx: str) -> list[str]:
    """PTX types of the kernel entry's non-pointer parameters, in order."""
    entry = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S)
    return [match.group(1) for match in ENTRY_PARAM.finditer(entry.group(1))] if entry else []


def resources(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, stack frame bytes, local memory bytes)`` per thread of the cubin Triton built, read by its
    bundled ``cuobjdump -res-usage``. Spilled registers live in the stack frame, so a non-zero stack is a spill
    (these kernels have no calls or local arrays that would need one)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    registers, stack, _, local = (int(value) for value in RESOURCES.search(report).groups())
    return registers, stack, local


def check(arch: int) -> list[Compiled]:
    """Compile every launch for ``arch`` and judge each distinct compiled kernel."""
    results: dict[tuple, Compiled] = {}
    for description, dtype, thunk in launches():
        sink: list = []
        try:
            with compile_only(arch, sink):
                thunk()
        except Exception as error:  # noqa: BLE001 - any compiler failure fails the gate, with its message
            entry = Compiled(kernel=description.split()[0], arch=arch, config=description, dtype=dtype)
            message = " / ".join(line.strip() for line in str(error).splitlines() if line.strip())
            entry.problems.append(f"does not compile: {type(error).__name__}: {message[-300:]}")
            results[(description, dtype, "error")] = entry
            continue
        for function, kernel, tiles, warps in sink:
            key = (function.fn.__name__, kernel.hash)
            if key in results:
                continue
            registers, stack, local = resources(kernel.asm["cubin"])
            config = f"tiles {'x'.join(map(str, tiles))} warps {warps} ({description})"
            entry = Compiled(
                kernel=function.fn.__name__, arch=arch, config=config, dtype=dtype, registers=registers, stack=stack,
                local=local, shared=kernel.metadata.shared, scalar_params=scalar_params(kernel.asm["ptx"]),
            )  # fmt: skip
            if stack or local:
                entry.problems.append(f"spills: {stack} B stack frame, {local} B local memory per thread")
            if entry.shared > SHARED_LIMIT[arch]:
                entry.problems.append(f"shared memory {entry.shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B")
            if dtype == "float64" and "f32" in entry.scalar_params:
                entry.problems.append("float64 kernel with 32-bit floating-point scalar parameters")
            results[key] = entry
    return list(results.values())


TUNED = {
    "_bmm_kernel": "bmm",
    "_factor_update_kernel": "factor_update",
    "_factor_partial_kernel": "factor_partial",
    "_factor_reduce_kernel": "factor_reduce",
}
"""Kernels whose launchers read ``num_warps`` from the table, by JIT function name: their table names."""
CANDIDATES = (4, 8, 2, 16)


def tune(arch: int) -> tuple[dict[str, int], list[str]]:
    """The warp table for ``arch``: for every configuration the launchers select, the first of
    :data:`CANDIDATES` with which it compiles without spills. Returns the non-default entries and the keys
    for which no candidate is spill-free."""
    import torch

    from kldwrm_fast.ops.triton_kernels import common

    table = common.WARPS_TABLE.setdefault(str(arch), {})  # the installed release's (see main)
    table.clear()
    hopeless = set()
    for _, dtype, thunk in launches():
        while True:
            sink: list = []
            with compile_only(arch, sink):
                thunk()
            advanced = False
            for function, kernel, tiles, warps in sink:
                name = TUNED.get(function.fn.__name__)
                if name is None or not any(resources(kernel.asm["cubin"])[1:]):
                    continue
                key = common.tile_key(name, getattr(torch, dtype), tiles)
                position = CANDIDATES.index(warps) + 1
                if position < len(CANDIDATES):
                    table[key] = CANDIDATES[position]
                    advanced = True
                else:
                    hopeless.add(key)
            if not advanced:
                break
    tuned = {key: value for key, value in sorted(table.items()) if value != common.DEFAULT_WARPS}
    return tuned, sorted(hopeless)


def retune(archs: list[int]) -> None:
    """Tune the installed Triton release's table for ``archs`` from scratch and write the file: that release's
    entries for other targets, and other releases' tables, stay as they are."""
    import triton

    from kldwrm_fast.ops.triton_kernels import common

    common.WARPS_TABLE = common.WARPS_TABLES.setdefault(common.release(triton.__version__), {})
    tuned = {}
    for arch in archs:
        tuned[str(arch)], hopeless = tune(arch)
        for key in hopeless:
            sys.stdout.write(f"sm_{arch} {key}: spills with every warp count tried {CANDIDATES}\n")
    common.WARPS_TABLE.update(tuned)
    common.WARPS_TABLE_FILE.write_text(json.dumps(common.WARPS_TABLES, indent=1, sort_keys=True) + "\n")


def table(entries: list[Compiled]) -> str:
    lines = [
        f"{'arch':<6} {'kernel':<24} {'dtype':<8} {'regs':>5} {'spill':>6} {'smem':>7}  {'f-params':<8} config",
    ]
    for e in sorted(entries, key=lambda e: (e.arch, e.kernel, e.dtype, e.config)):
        floats = ",".join(sorted({p for p in e.scalar_params if p.startswith("f")})) or "-"
        flag = "  <-- " + "; ".join(e.problems) if e.problems else ""
        lines.append(
            f"sm_{e.arch:<3} {e.kernel:<24} {e.dtype:<8} {e.registers:>5} {e.stack + e.local:>6} "
            f"{e.shared:>7}  {floats:<8} {e.config}{flag}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability ×10 (default: 90 and 80)")
    parser.add_argument("--json", help="also write the entries to this file")
    parser.add_argument("--tune", action="store_true", help="first rewrite the launchers' warp table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    archs = args.arch or [90, 80]
    if args.tune:
        retune(archs)
    # One process per target: compilation is CPU-bound and the two targets share nothing.
    with concurrent.futures.ProcessPoolExecutor(len(archs), mp_context=multiprocessing.get_context("spawn")) as pool:
        entries = [entry for result in pool.map(check, archs) for entry in result]
    sys.stdout.write(table(entries) + "\n")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(e) for e in entries], handle, indent=1)
    failed = [e for e in entries if e.problems]
    sys.stdout.write(f"{len(entries)} compiled kernels, {len(failed)} with problems\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
