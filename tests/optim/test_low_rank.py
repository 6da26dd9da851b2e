"""``rank=r`` (KFAC, SO; docs/algorithms.md §6.7): with ``r`` equal to every side's width the step is the exact one;
with a smaller ``r`` every step is the dense solve with the explicitly truncated factors, whose kept pairs are the
averages' top eigenpairs; resume is bit-identical and bad options are refused in one line."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature import eigen

OPTIONS = dict(lr=0.1, damping=0.03, kl_clip=None, fisher="empirical")


def square_model(seed=0):
    """Every factor side is 8 wide (7 inputs and the folded bias; 8 outputs)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 8)).double()


def make(cls, model, **extra):
    return cls(model, **dict(OPTIONS, **(dict(momentum=0.0) if cls is KFAC else {}), **extra))


def batches(n_in, n_out, count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, n_in, generator=gen, dtype=torch.float64), torch.randint(0, n_out, (16,), generator=gen))
            for _ in range(count)]  # fmt: skip


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cadence", [(1, 1), (1, 3), (2, 4)])
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_a_rank_equal_to_every_side_gives_the_exact_trajectory(cls, cadence):
    stat_freq, inv_freq = cadence
    data = batches(7, 8, 9)
    runs = []
    for rank in (None, 8):
        model = square_model()
        opt = make(cls, model, rank=rank, stat_freq=stat_freq, inv_freq=inv_freq, rho=0.9)
        train(model, opt, data)
        runs.append((model, opt))
    assert runs[1][1].estimator.decompositions["low_rank"] > 0 == runs[1][1].estimator.decompositions["exact"]
    for a, b in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def truncated(u, d, t):
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    return u @ torch.diag(d) @ u.mT + t * (eye - u @ u.mT)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_every_step_is_the_dense_solve_with_the_truncated_factors(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    opt = make(cls, model, rank=5, rho=0.0, stat_freq=1, inv_freq=1)
    blocks = opt.curvature.blocks
    for x, y in batches(12, 3, 3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [block.gradient(0.0) for block in blocks]
        before = [block.matrix([p.detach().clone() for p in block.params]) for block in blocks]
        if cls is SOKLDWRM:  # its recursion off: P(V) alone
            opt.global_state["lr_prev"] = None
        opt.step()
        for block, v, w in zip(blocks, grads, before):
            state = opt.block_state(block)
            factors = []
            for side in "GA":
                average = state[f"{side}_ea"]
                if f"t{side}" not in state:  # the 3-wide output side stays dense
                    assert average.shape[0] < 5
                    factors.append(average)
                    continue
                u, d, t = state[f"Q{side}"], state[f"d{side}"], state[f"t{side}"]
                values, vectors = torch.linalg.eigh(average)  # the kept pairs: the top five, the tail their mean
                torch.testing.assert_close(d, values[-5:], rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(u @ u.mT, vectors[:, -5:] @ vectors[:, -5:].mT, rtol=0, atol=1e-7)
                torch.testing.assert_close(t, values[:-5].clamp_min(0).mean(), rtol=1e-9, atol=1e-12)
                factors.append(truncated(u, d, t))
            big = torch.kron(*factors) + OPTIONS["damping"] * torch.eye(v.numel(), dtype=v.dtype)
            step = torch.linalg.solve(big, v.reshape(-1)).reshape(v.shape)
            got = block.matrix([p.detach() for p in block.params])
            torch.testing.assert_close(got, w - OPTIONS["lr"] * step, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("warm", ["exact", "warm"])
def test_a_rank_removed_between_steps_takes_effect_at_the_next_inverse_step(warm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    opt = make(KFAC, model, rank=5, rho=0.0, stat_freq=1, inv_freq=2, eigensolver=warm)
    data = batches(12, 3, 5)
    train(model, opt, data[:3])  # the inverse steps 0 and 2 made low-rank sides
    opt.param_groups[0]["rank"] = None
    block = opt.curvature.blocks[0]
    for k, (x, y) in enumerate(data[3:], start=3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        v = block.gradient(0.0)
        before = block.matrix([p.detach().clone() for p in block.params])
        opt.step()
        state = opt.block_state(block)
        assert ("tA" in state) == (k == 3)  # step 3 still steps with the low-rank sides; step 4 decomposes anew
        factors = [truncated(state[f"Q{s}"], state[f"d{s}"], state[f"t{s}"]) if f"t{s}" in state else state[f"{s}_ea"]
                   for s in "GA"]  # fmt: skip
        big = torch.kron(*factors) + OPTIONS["damping"] * torch.eye(v.numel(), dtype=v.dtype)
        step = torch.linalg.solve(big, v.reshape(-1)).reshape(v.shape)
        got = block.matrix([p.detach() for p in block.params])
        torch.testing.assert_close(got, before - OPTIONS["lr"] * step, rtol=1e-10, atol=1e-12)


def test_a_failed_full_decomposition_after_a_rank_removal_falls_back_to_the_identity_not_the_low_rank_basis(
    monkeypatch,
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    opt = make(KFAC, model, rank=5, stat_freq=1, inv_freq=1)
    data = batches(12, 3, 2)
    train(model, opt, data[:1])
    opt.param_groups[0]["rank"] = None

    def failing(matrix):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(eigen, "_torch_eigh", failing)
    with pytest.warns(RuntimeWarning, match="no earlier one exists"):
        train(model, opt, data[1:])
    state = opt.block_state(opt.curvature.blocks[0])
    assert "tA" not in state and torch.equal(state["QA"], torch.eye(13, dtype=torch.float64))


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_a_low_rank_run_resumes_bit_identically(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    opt = make(cls, model, rank=4, rho=0.9, stat_freq=1, inv_freq=2)
    data = batches(12, 3, 8)
    train(model, opt, data[:5])
    twin_model = copy.deepcopy(model)
    twin = make(cls, twin_model, rho=0.9, stat_freq=1, inv_freq=2)  # the checkpoint's rank governs
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert twin.param_groups[0]["rank"] == 4
    train(model, opt, data[5:])
    train(twin_model, twin, data[5:])
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_low_rank_with_momentum_and_the_kl_clip_trains_a_float32_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 4))
    opt = KFAC(model, lr=0.05, rank=6, stat_freq=1, inv_freq=5)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 30, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    state = opt.block_state(opt.curvature.blocks[0])
    assert state["QA"].shape == (31, 6) and state["QG"].shape == (20, 6) and state["QA"].dtype == torch.float32


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(rank=0), r"Invalid rank: 0; expected an integer >= 1 or None"),
        (dict(rank=2.5), r"Invalid rank: 2.5; expected an integer >= 1 or None"),
        (dict(rank=4, damping_form="factored"), r"Invalid rank: 4 with damping_form='factored'"),
    ],
)
def test_bad_rank_options_are_refused_in_one_line(extra, message):
    with pytest.raises(ValueError, match=message):
        make(KFAC, square_model(), **extra)


def test_the_q_family_does_not_take_a_rank():
    with pytest.raises(TypeError, match="rank"):
        QKLDWRM(square_model(), rank=4)
