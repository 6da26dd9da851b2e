"""Whole optimizers on every available backend follow the PyTorch reference trajectory."""

import copy
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.ops import reference

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


def model_and_batches(width=8, device="cpu", dtype=torch.float32):
    """A small CNN (three equal hidden Linear layers of ``width``) and 7 batches, on ``device`` in ``dtype``."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4),
    ).to(device=device, dtype=dtype)  # fmt: skip
    gen = torch.Generator().manual_seed(12)
    batches = [
        (
            torch.randn(10, 1, 6, 6, generator=gen, dtype=dtype).to(device),
            torch.randint(0, 4, (10,), generator=gen).to(device),
        )
        for _ in range(7)
    ]
    return model, batches


def trajectory(cls, backend, model, batches, **extra):
    torch.manual_seed(13)
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=4, backend=backend, **extra)
    params = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return params, opt


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


def test_equal_shape_blocks_are_preconditioned_in_one_batch():
    model, batches = model_and_batches()
    model = model.double()
    batches = [(x.double(), y) for x, y in batches]
    per_block = copy.deepcopy(model)
    batched, opt = trajectory(QKLDWRM, "torch", model, batches)
    assert opt._batches.groups == [[0], [1], [2, 3], [4]]
    states = opt.block_states()
    assert states[2]["QA"]._base is states[3]["QA"]._base is not None  # one stacked tensor, no copies
    torch.manual_seed(13)
    reference_opt = QKLDWRM(per_block, lr=0.05, stat_freq=2, inv_freq=4)
    reference_opt._batches.groups = [[i] for i in range(len(reference_opt.curvature.blocks))]
    for (x, y), expected in zip(batches, batched):
        reference_opt.zero_grad()
        F.cross_entropy(per_block(x), y).backward()
        reference_opt.step()
        actual = torch.cat([p.detach().reshape(-1) for p in per_block.parameters()])
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-13)


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
