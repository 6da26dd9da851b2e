"""Ahead-of-time gate for the built CUDA extension ``kldwrm_fast._C``, on a machine without a GPU.

Reads the build log of ``KLDWRM_PTXAS_VERBOSE=1 pip install -v ...`` (nvcc's ``-Xptxas -v`` lines) and the
built shared object (``cuobjdump``), and fails on:

- any kernel with spill stores or loads in the ptxas report, or with a stack frame or local memory in the
  shared object's resource usage (the same spill seen from the built artifact);
- a shared object without SASS for each required architecture (``--sass 90``) or without PTX (forward
  compatibility: a newer GPU JIT-compiles the PTX);
- a build log with no ptxas report at all (the gate would otherwise pass on nothing).

Usage: ``python tools/cuda_build_gate.py BUILD_LOG SHARED_OBJECT [--sass 90 ...]``; prints one table
(kernel, architecture, registers, spills, shared memory) and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
FUNCTION = re.compile(r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def cuobjdump() -> str:
    """The toolkit's cuobjdump, else the one Triton bundles."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def demangled(name: str) -> str:
    """A readable kernel name: the template's name and arguments, namespaces dropped."""
    try:
        text = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    text = re.sub(r"kldwrm::(\(anonymous namespace\)::)?", "", text)
    return text.split("(")[0]


def ptxas_reports(log: str) -> list[tuple[str, str, int, int]]:
    """``(kernel, arch, spill stores, spill loads)`` for each entry ptxas compiled, from ``-Xptxas -v``."""
    reports, current = [], None
    for line in log.splitlines():
        entry = ENTRY.search(line)
        if entry:
            current = entry.groups()
            continue
        spills = SPILLS.search(line)
        if spills and current is not None:
            reports.append((current[0], current[1], int(spills.group(2)), int(spills.group(3))))
            current = None
    return reports


def resource_usage(shared_object: str) -> list[tuple[str, str, int, int, int, int]]:
    """``(kernel, arch, registers, stack, shared, local)`` for each kernel of each ELF in the shared object."""
    out = subprocess.run([cuobjdump(), "-res-usage", shared_object], capture_output=True, text=True, check=True).stdout
    rows = []
    for section in re.split(r"Fatbin elf code:", out)[1:]:
        arch = re.search(r"arch = (sm_\d+a?)", section).group(1)
        for match in FUNCTION.finditer(section):
            name, *numbers = match.groups()
            rows.append((name, arch, *map(int, numbers)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build_log")
    parser.add_argument("shared_object")
    parser.add_argument("--sass", action="append", help="required SASS architecture, e.g. 90 (default: 90)")
    args = parser.parse_args(argv)
    with open(args.build_log, errors="replace") as handle:
        log = handle.read()
    problems = []
    reports = ptxas_reports(log)
    if not reports:
        problems.append("the build log holds no ptxas report: build with KLDWRM_PTXAS_VERBOSE=1 and pip -v")
    for kernel, arch, stores, loads in reports:
        if stores or loads:
            problems.append(f"ptxas: {demangled(kernel)} on {arch} spills {stores} B stores / {loads} B loads")

    rows = resource_usage(args.shared_object)
    lines = [f"{'arch':<7} {'regs':>5} {'spill':>6} {'smem':>6}  kernel"]
    for name, arch, registers, stack, shared, local in sorted(rows, key=lambda r: (r[1], demangled(r[0]))):
        lines.append(f"{arch:<7} {registers:>5} {stack + local:>6} {shared:>6}  {demangled(name)}")
        if stack or local:
            problems.append(f"{demangled(name)} on {arch}: {stack} B stack frame, {local} B local memory")
    elves = subprocess.run([cuobjdump(), "--list-elf", args.shared_object], capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump(), "--list-ptx", args.shared_object], capture_output=True, text=True).stdout
    for arch in args.sass or ["90"]:
        if f"sm_{arch}" not in elves:
            problems.append(f"no SASS for sm_{arch} in {os.path.basename(args.shared_object)}")
    if ".ptx" not in ptx:
        problems.append(f"no PTX in {os.path.basename(args.shared_object)} (no forward compatibility)")
    sys.stdout.write("\n".join(lines) + "\n")
    sass = sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", elves)))
    virtual = sorted(set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx)))
    sys.stdout.write(f"{len(rows)} kernels, {len(reports)} ptxas reports; SASS for {sass}, PTX for {virtual}\n")
    for problem in problems:
        sys.stdout.write(f"problem: {problem}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
