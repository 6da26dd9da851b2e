"""Host-side cost of one plain optimizer step (no statistics, no eigendecomposition) on the paper's CNN.

    python -m pytest bench/test_host_overhead.py --benchmark-only

On a GPU, small models are launch-bound: SGD on the paper CNN takes 1.69 ms per iteration on an H200, so a
step that issues a few hundred operations costs as much as the whole iteration. This times ``opt.step()``
alone (host time until it returns, which on CUDA is the enqueueing; the numerics check's one device read
included) with a batch of two, where the arithmetic is negligible, and records in ``extra_info`` how many
ATen operations the step dispatches (``compute_ops``: kernels on a GPU; ``view_ops``: metadata only). The
``compiled`` cases time our optimizers' :meth:`compiled_step` (the plain step through ``torch.compile`` with
``fullgraph=True``; on CUDA with ``mode="reduce-overhead"``, replayed as a CUDA graph); their operation count is
not taken (the compiled graph runs fused kernels, not ATen operations one by one).
"""

import pytest
import torch
import torch.nn.functional as F
from entries import BACKENDS, ENTRIES, make_step
from machine import DEVICE, environment, synchronize
from torch.utils._python_dispatch import TorchDispatchMode
from workloads import WORKLOADS

VIEW_OPS = {
    "alias", "as_strided", "detach", "expand", "permute", "reshape", "select", "slice", "squeeze", "t",
    "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "_reshape_alias",
}  # fmt: skip


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.compute_ops = 0
        self.view_ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten":
            if func._opname in VIEW_OPS:
                self.view_ops += 1
            else:
                self.compute_ops += 1
        return func(*args, **(kwargs or {}))


COMPILED_BACKEND = "cuda" if "cuda" in BACKENDS else "torch"  # the eager steps around it use our kernels
COMPILED = [f"{name}-{COMPILED_BACKEND}" for name in ("kfac", "so", "q", "qexact")]


@pytest.mark.parametrize("entry", ENTRIES + [f"{entry}-compiled" for entry in COMPILED])
def test_plain_step_host_time(benchmark, entry):
    compiled = entry.endswith("-compiled")
    entry = entry.removesuffix("-compiled")
    make, shape, _ = WORKLOADS["paper-cnn"][False]
    torch.manual_seed(0)
    model = make().to(DEVICE)
    x = torch.randn(2, *shape, device=DEVICE)
    y = torch.randint(0, 10, (2,), device=DEVICE)
    opt, step = make_step(entry, model, x, y, (10**6, 10**6))  # statistics and decompositions at step 0 only
    for _ in range(3):
        step()

    def plain_gradients():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        synchronize()

    plain_gradients()
    benchmark.group = "plain step host time, paper-cnn, batch 2"
    benchmark.extra_info.update(environment())
    if compiled:
        step = opt.compiled_step(**({"mode": "reduce-overhead"} if DEVICE.type == "cuda" else {}))
        for _ in range(3):  # compile (and record the graph) outside the timing
            plain_gradients()
            step()
        benchmark.pedantic(step, setup=plain_gradients, rounds=200, warmup_rounds=5)
        return
    counter = OpCounter()
    with counter:
        opt.step()
    benchmark.pedantic(opt.step, setup=plain_gradients, rounds=200, warmup_rounds=5)
    benchmark.extra_info["compute_ops"] = counter.compute_ops
    benchmark.extra_info["view_ops"] = counter.view_ops
