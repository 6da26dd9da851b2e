"""Per-iteration time (forward + backward + optimizer step) of every optimizer on the three workloads.

    python -m pytest bench/test_step_time.py --benchmark-only [--benchmark-json out.json]

Groups are ``workload cadence``; each entry's mean runs over whole cadence cycles (``inv_freq`` steps), so
the occasional statistics and eigendecomposition steps are counted at their real frequency.
"""

import pytest
import torch
from entries import CADENCES, ENTRIES, make_step
from machine import DEVICE, FULL, environment, synchronize
from workloads import WORKLOADS, build


def state_bytes(opt) -> int:
    """Bytes of every tensor storage the optimizer state keeps alive (tensors inside tuples included)."""
    seen, total = set(), 0
    pending = [value for state in opt.state.values() if isinstance(state, dict) for value in state.values()]
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):
            pending.extend(value)
        elif torch.is_tensor(value):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("cadence", list(CADENCES))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_step_time(benchmark, workload, cadence, entry):
    model, x, y = build(workload, FULL, DEVICE)
    opt, step = make_step(entry, model, x, y, CADENCES[cadence])

    def timed():
        step()
        synchronize()

    cycle = CADENCES[cadence][1]
    rounds = cycle * (1 if cycle >= 10 else 10)
    if entry.startswith("qe") and not FULL:
        rounds = max(cycle, 10)
    for _ in range(2):  # warm-up: first statistics and decompositions, kernel compilation
        timed()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = f"{workload} {cadence}"
    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    benchmark.extra_info.update(environment())
    benchmark.extra_info["state_bytes"] = state_bytes(opt)
    benchmark.extra_info["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
