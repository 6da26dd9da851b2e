"""Shared choices for the Triton kernels: accumulation dtype, dot precision, tile sizes, launch device.

Floating-point scalar arguments of every kernel are annotated ``tl.float64``: Triton passes an unannotated
Python float as a 32-bit ``.param .f32``, which would round ``alpha``, ``damping`` and the EA weights of a
float64 kernel to single precision (about 1e-7 relative). Kernels turn them into their accumulation dtype
with :func:`as_compute`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import re

import torch
import triton
import triton.language as tl

# Products that feed eigenbasis projections must be full fp32 (docs/algorithms.md §6), never plain TF32.
DOT_PRECISION = "ieee"

MAX_GRID_YZ = 65535
"""Largest grid extent along axes 1 and 2 of a CUDA launch; launchers split batches beyond it."""


@triton.jit
def as_compute(value, ACC: tl.constexpr):
    """A float64 scalar argument as a scalar of dtype ``ACC``. (``tl.cast(value, ACC)`` would not do: the CPU
    interpreter passes the Python float through, and its cast rounds it to float32 on the way.)"""
    return (tl.full((), 0, ACC) + value).to(ACC)


def release(version: str) -> str:
    """``"major.minor"`` of a version string (``"3.6.0"``, ``"3.6.0+git1a2b"`` and ``"3.6rc1"`` are ``"3.6"``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"not a major.minor version: {version!r}")
    return f"{int(match[1])}.{int(match[2])}"


def nearest_release(available, wanted: str) -> str | None:
    """The release in ``available`` closest to ``wanted`` (itself if listed; between two equally close, the newer),
    None when nothing is available."""

    def number(name):
        major, minor = name.split(".")
        return int(major) * 1000 + int(minor)

    return min(available, key=lambda name: (abs(number(name) - number(wanted)), -number(name)), default=None)


WARPS_TABLE_FILE = pathlib.Path(__file__).with_name("warps.json")
WARPS_TABLES: dict[str, dict[str, dict[str, int]]] = json.loads(WARPS_TABLE_FILE.read_text())
"""Warps per program, by Triton release (``"3.8"``), target (``"90"`` for sm_90) and :func:`tile_key`, where four
(the default) would spill registers. Written by ``python tools/triton_aot.py --tune`` for the installed Triton,
which compiles every configuration the launchers select for each target and keeps the first spill-free choice of
4, 8, 2, 16 warps; the gate in ``.ci/run`` re-checks that no configuration spills with it. Per release, because
register allocation differs between Triton's releases: the table tuned with 3.8 left eight configurations
spilling 8–40 bytes with 3.6 (the GPU machines' release). Targets not in the table get four warps."""

WARPS_TABLE: dict[str, dict[str, int]] = WARPS_TABLES.get(
    nearest_release(WARPS_TABLES, release(triton.__version__)), {}
)
"""The installed Triton's table in :data:`WARPS_TABLES`: its own release's, else the nearest release's."""

DEFAULT_WARPS = 4


def tile_key(kernel: str, dtype: torch.dtype, tiles: tuple[int, ...]) -> str:
    return f"{kernel}:{str(dtype).removeprefix('torch.')}:{'x'.join(map(str, tiles))}"


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def target_arch(tensor: torch.Tensor) -> str | None:
    """The compute capability the kernels compile for (``"90"``), None off CUDA (the interpreter)."""
    return _capability(tensor.device) if tensor.is_cuda else None


def warps(kernel: str, tensor: torch.Tensor, *tiles: int) -> int:
    """``num_warps`` for ``kernel`` with block sizes ``tiles`` on ``tensor``'s dtype and device."""
    table = WARPS_TABLE.get(target_arch(tensor) or "", {})
    return table.get(tile_key(kernel, tensor.dtype, tiles), DEFAULT_WARPS)


def compute_dtype(dtype: torch.dtype):
    """Accumulation dtype: float64 for float64 data, float32 for everything narrower."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile(size: int, largest: int = 64) -> int:
    """A power-of-two tile edge ≥ 16 (the smallest ``tl.dot`` accepts) that does not overshoot ``size`` much."""
    edge = 16
    while edge < size and edge < largest:
        edge *= 2
    return edge


def on_device_of(tensor: torch.Tensor):
    """Context in which Triton launches go to ``tensor``'s GPU (Triton uses the *current* device otherwise,
    so a model on ``cuda:1`` without ``torch.cuda.set_device`` would launch on device 0); nothing on CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
