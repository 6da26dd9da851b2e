"""Whole optimizers on every available backend follow the PyTorch reference trajectory."""

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.trajectories import model_and_batches, trajectory
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.ops import reference

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter"
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_triton_backend_follows_the_torch_trajectory(cls):
    pytest.importorskip("triton")
    extra = dict(n_inner=2) if cls is QEKLDWRM else {}
    model, batches = model_and_batches()
    reference, _ = trajectory(cls, "torch", copy.deepcopy(model), batches, **extra)
    ours, opt = trajectory(cls, "triton", model, batches, **extra)
    assert opt.backend == "triton"
    for a, b in zip(ours, reference):
        assert (a - b).norm() <= 1e-5 * b.norm()


def test_equal_shape_blocks_are_preconditioned_in_one_batch_on_every_step():
    """The two 8→8 layers form one group and are computed in one batched call on every step — inverse, statistics
    and plain (with operations that take stacked batches only, as the kernels do) — and that gives the trajectory
    of one call per block."""
    model, batches = model_and_batches()
    model = model.double()
    batches = [(x.double(), y) for x, y in batches]
    per_block = copy.deepcopy(model)
    torch.manual_seed(13)
    opt = QKLDWRM(model, lr=0.05, stat_freq=2, inv_freq=4)
    opt._ops = dataclasses.replace(opt._ops, takes_unbatched=False)  # no per-block fast path
    groups = opt._batches
    assert groups.groups == [[0], [1], [2, 3], [4]]
    sizes: list[int] = []
    original = groups.per_group

    def recording(ops, states, keys, per_block_tensors, compute):
        sizes.extend(len(group) for group in groups.groups)
        return original(ops, states, keys, per_block_tensors, compute)

    groups.per_group = recording
    torch.manual_seed(13)
    reference_opt = QKLDWRM(per_block, lr=0.05, stat_freq=2, inv_freq=4)
    reference_opt._batches.groups = [[i] for i in range(len(reference_opt.curvature.blocks))]
    for k, (x, y) in enumerate(batches):
        sizes.clear()
        for optimizer, net in ((opt, model), (reference_opt, per_block)):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        assert 2 in sizes, f"step {k} computed the equal-shape blocks one by one"
        actual = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        expected = torch.cat([p.detach().reshape(-1) for p in per_block.parameters()])
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)
    states = opt.block_states()
    assert states[2]["QA"]._base is states[3]["QA"]._base is not None  # one stacked tensor, no copies


@pytest.mark.parametrize("backend, lone_dims", [("torch", {2}), ("triton", {3})])
def test_a_lone_block_is_passed_unbatched_only_to_a_backend_that_takes_it(backend, lone_dims):
    # The batch-of-one views and batched matmuls cost more host time than a small block's arithmetic.
    model, batches = model_and_batches()
    opt = KFAC(model, stat_freq=1, inv_freq=1, backend="torch")
    seen = {}

    def spy(q_g, d_g, q_a, d_a, v, damping):
        seen.setdefault(v.shape[-2:], set()).add(v.dim())
        return reference.precondition(q_g, d_g, q_a, d_a, v, damping)

    opt._ops = dataclasses.replace(
        opt._ops, functions={**opt._ops.functions, "precondition": spy}, takes_unbatched=backend == "torch"
    )
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt._batches.groups == [[0], [1], [2, 3], [4]]
    assert seen[(8, 9)] == {3}  # two blocks of one shape: always one batched call
    assert seen[(3, 10)] == seen[(8, 28)] == seen[(4, 9)] == lone_dims


def test_eigendecompositions_keep_no_larger_tensor_alive():
    # Factor sizes group the eigensolver's calls (input factors of blocks 2, 3, 4 are all 9×9; output factors
    # of blocks 1, 2, 3 are 8×8) differently from block shapes; state must not pin the solver's stacks.
    model, batches = model_and_batches()
    opt = KFAC(model, stat_freq=1, inv_freq=1)
    for x, y in batches[:2]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    group_of = {i: group for group in opt._batches.groups for i in group}
    for index, state in enumerate(opt.block_states()):
        for key in ("QA", "dA", "QG", "dG"):
            tensor = state[key]
            assert tensor.untyped_storage().nbytes() == len(group_of[index]) * tensor.numel() * tensor.element_size()


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_blocks_with_a_diagonal_side_never_reach_a_fused_kernel(cls):
    """Kernels take dense factors only: with a stand-in for a GPU backend's operations (stacked batches only, as
    the kernels take), the embedding's, the norm's and a wide layer's groups run the reference instead, and the
    trajectory is the torch backend's."""

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(12, 6), nn.LayerNorm(6), nn.Linear(6, 40),
                             nn.Tanh(), nn.Linear(40, 3)).double()  # fmt: skip

    def kernel(name):
        def call(q_g, d_g, q_a, d_a, v, *rest):
            assert q_g.dim() == q_a.dim() == v.dim() == 3, f"{name} got a diagonal side"
            calls.append(tuple(v.shape))
            return getattr(reference, name)(q_g, d_g, q_a, d_a, v, *rest)

        return call

    calls: list = []
    runs = []
    for stand_in in (False, True):
        net = model()
        opt = cls(net, lr=0.05, stat_freq=1, inv_freq=2, max_factor_dim=32, fisher="empirical")
        if stand_in:
            functions = {**opt._ops.functions, "precondition": kernel("precondition"),
                         "q_precondition": kernel("q_precondition")}  # fmt: skip
            opt.estimator.ops = dataclasses.replace(opt._ops, functions=functions, takes_unbatched=False)
        for k in range(4):
            gen = torch.Generator().manual_seed(k)
            x, y = torch.randint(0, 9, (8, 3), generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        runs.append([p.detach().clone() for p in net.parameters()])
    assert sorted({block.name: block.diagonal for block in opt.curvature.blocks}.items()) == [
        ("0", ("A",)), ("2", ()), ("3", ("A",)), ("4", ("G",)), ("6", ("A",))]  # fmt: skip
    assert calls and set(calls) == {(1, 6, 13)}  # only the dense Linear(12, 6) reached the stand-in kernels
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
