"""The machine the benchmarks run on: full sizes on CUDA, reduced sizes on CPU; its description for reports."""

import time

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = DEVICE.type == "cuda"


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def ms_per_call(function, calls: int, per: int) -> float:
    """Milliseconds per ``per`` units of work of ``calls`` calls of ``function``, timed between device syncs."""
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize()
    return (time.perf_counter() - start) / per * 1e3


def environment() -> dict:
    """Machine and versions for every benchmark's ``extra_info``."""
    info = {"device": torch.cuda.get_device_name() if FULL else "cpu", "torch": torch.__version__}
    info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
