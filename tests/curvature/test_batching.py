"""Preconditioning on the PyTorch backend (K-FAC's, and Q's between inverse steps): block by block with cached
eigenvalue products and denominators, bit for bit the reference."""

from types import SimpleNamespace

import pytest
import torch

from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.ops import operations, reference
from kldwrm_fast.optim.q_steps import q_cached_steps

SHAPES = [(3, 5), (4, 6), (4, 6), (2, 7)]  # the two (4, 6) blocks form one batch group


def blocks_and_states(dtype):
    """Blocks of SHAPES (duck-typed: shape and key) and random decompositions, as the optimizers keep them."""
    generator = torch.Generator().manual_seed(0)
    blocks, states = [], []
    for n_out, n_in in SHAPES:
        blocks.append(SimpleNamespace(shape=(n_out, n_in), diagonal=(), key=torch.zeros(1, dtype=dtype)))
        states.append({
            "QG": torch.linalg.qr(torch.randn(n_out, n_out, generator=generator, dtype=dtype))[0],
            "dG": torch.rand(n_out, generator=generator, dtype=dtype),
            "QA": torch.linalg.qr(torch.randn(n_in, n_in, generator=generator, dtype=dtype))[0],
            "dA": torch.rand(n_in, generator=generator, dtype=dtype),
        })  # fmt: skip
    vs = [torch.randn(shape, generator=generator, dtype=dtype) for shape in SHAPES]
    return blocks, states, vs


def expected(states, vs, damping):
    return [
        reference.precondition(state["QG"], state["dG"], state["QA"], state["dA"], v, damping)
        for state, v in zip(states, vs)
    ]


def assert_identical(actual, wanted):
    assert len(actual) == len(wanted)
    for a, w in zip(actual, wanted):
        assert torch.equal(a, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_precondition_is_the_reference_bit_for_bit(dtype):
    blocks, states, vs = blocks_and_states(dtype)
    batches = BlockBatches(blocks)
    assert batches.groups == [[0], [1, 2], [3]]
    ops = operations("torch")
    for _ in range(2):  # the second call reads the cached denominators
        assert_identical(batches.precondition(ops, states, vs, 0.01), expected(states, vs, 0.01))


def expected_q(states, rotated, damping, lr, scales):
    results = [
        reference.q_cached_step(s["QG"], s["dG"], s["QA"], s["dA"], r, damping, lr, *scale)
        for s, r, scale in zip(states, rotated, scales)
    ]
    return [step for step, _ in results], [product for _, product in results]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_steps_between_inverse_steps_are_the_reference_bit_for_bit(dtype):
    blocks, states, rotated = blocks_and_states(dtype)
    batches, ops = BlockBatches(blocks), operations("torch")
    for lr in (0.1, 0.1, 0.2):  # the second call reads the cache; the third changes the scale
        scales = [(1.0 + lr, 1.0 + lr)] * 3 + [(1.0, 1.0 + lr)]
        steps, products = q_cached_steps(batches, ops, states, rotated, 0.01, lr, scales)
        wanted_steps, wanted_products = expected_q(states, rotated, 0.01, lr, scales)
        assert_identical(steps, wanted_steps)
        assert_identical(products, wanted_products)


def test_cached_denominator_follows_damping_and_every_change_of_the_eigenvalues():
    blocks, states, vs = blocks_and_states(torch.float64)
    batches, ops = BlockBatches(blocks), operations("torch")
    batches.precondition(ops, states, vs, 0.01)

    def check(damping):
        assert_identical(batches.precondition(ops, states, vs, damping), expected(states, vs, damping))
        scales = [(1.5, 1.5)] * len(states)
        steps, products = q_cached_steps(batches, ops, states, vs, damping, 0.5, scales)
        wanted_steps, wanted_products = expected_q(states, vs, damping, 0.5, scales)
        assert_identical(steps + products, wanted_steps + wanted_products)

    check(0.1)  # a new damping (a user's schedule)
    states[0]["dA"].mul_(2.0)  # written in place, as inverse steps store a decomposition of the same shape
    states[1]["dG"].copy_(torch.rand(4, dtype=torch.float64))
    check(0.1)
    stacked = torch.stack([states[1]["dA"], states[2]["dA"]])  # views of one stack, as a batch group keeps them
    states[1]["dA"], states[2]["dA"] = stacked.unbind(0)
    check(0.1)
    stacked.add_(1.0)  # a write to the stack changes both views
    check(0.1)
    states[3]["dG"] = torch.rand(2, dtype=torch.float64)  # replaced (load_state_dict, a new shape's solver output)
    check(0.1)
    with torch.inference_mode():  # no version counter: made afresh every time
        states[3]["dA"] = torch.rand(7, dtype=torch.float64)
    check(0.1)
    with torch.inference_mode():
        states[3]["dA"].mul_(3.0)
    check(0.1)
