"""The plain step compiles into one graph (``torch.compile(..., fullgraph=True)``) and computes what eager does."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM, SOKLDWRM


def twins():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(20)]
    return model, copy.deepcopy(model), batches


def build(cls, model, **extra):
    torch.manual_seed(2)  # the sampled Fisher's generator is seeded from the global one
    return cls(model, lr=0.05, stat_freq=5, inv_freq=10, **extra)


def side_by_side(cls, device="cpu", **compile_options):
    """Train the twins, one with ``step()``, the other with ``compiled_step(**compile_options)``; both models."""
    torch._dynamo.reset()
    model, twin, batches = twins()
    model, twin = model.to(device), twin.to(device)
    eager, compiled_opt = build(cls, model), build(cls, twin)
    step = compiled_opt.compiled_step(**compile_options)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        for net, opt in ((model, eager), (twin, compiled_opt)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        eager.step()
        step()
    assert compiled_opt.global_state["step"] == len(batches)
    return model, twin


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_compiled_plain_steps_follow_eager_over_twenty_steps(cls):
    model, twin = side_by_side(cls)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_plain_step_traces_without_a_graph_break():
    model, _, batches = twins()
    opt = build(QKLDWRM, model, clip=2.0, kl_clip=0.1)
    for x, y in batches[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(batches[2][0]), batches[2][1]).backward()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_reduce_overhead_replays_plain_steps_as_cuda_graphs_and_follows_eager(cls):
    model, twin = side_by_side(cls, "cuda", mode="reduce-overhead")
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
