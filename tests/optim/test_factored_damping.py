"""``damping_form="factored"`` (KFAC, SO; docs/algorithms.md §6.6): the step is the dense solve with Martens and
Grosse's factored Tikhonov damping built from explicit factors, the cached inverses follow the damping, and a resumed
run continues bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, SOKLDWRM

OPTIONS = dict(lr=0.1, rho=0.0, damping=0.03, stat_freq=1, inv_freq=1, kl_clip=None, fisher="empirical",
               damping_form="factored")  # fmt: skip


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))


def make(cls, model, **extra):
    options = dict(OPTIONS, **(dict(momentum=0.0) if cls is KFAC else {}), **extra)
    return cls(model, **options)


def explicit_step(factor_a: torch.Tensor, factor_g: torch.Tensor, v: torch.Tensor, damping: float) -> torch.Tensor:
    """``(Γ + √δ/π I)⁻¹ V (A + π√δ I)⁻¹`` with ``π² = (tr A / n_in) / (tr Γ / n_out)``, by dense solves; a diagonal
    side given as its vector."""
    a = torch.diag(factor_a) if factor_a.dim() == 1 else factor_a
    g = torch.diag(factor_g) if factor_g.dim() == 1 else factor_g
    pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
    root = damping**0.5
    left = torch.linalg.solve(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype), v)
    return torch.linalg.solve(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype), left.mT).mT


@pytest.mark.parametrize("max_factor_dim", [None, 5])  # 5: the first layer's 7-wide input side is diagonal
@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_every_step_is_the_dense_solve_with_factored_damping(cls, max_factor_dim):
    model, _, _ = model_and_batch()
    opt = make(cls, model, max_factor_dim=max_factor_dim)
    blocks = opt.curvature.blocks
    assert (max_factor_dim is not None) == any(block.diagonal for block in blocks)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # ρ = 0, SO's recursion off (its first step, then) and KFAC without momentum: V and the factors
        opt.zero_grad()
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        F.cross_entropy(model(x), torch.randint(0, 3, (16,), generator=gen)).backward()
        grads = [block.gradient(0.0) for block in blocks]
        before = [block.matrix([p.detach().clone() for p in block.params]) for block in blocks]
        if cls is SOKLDWRM:
            opt.global_state["lr_prev"] = None
        opt.step()
        for block, v, w in zip(blocks, grads, before):
            state = opt.block_state(block)
            expected = w - OPTIONS["lr"] * explicit_step(state["A_ea"], state["G_ea"], v, OPTIONS["damping"])
            got = block.matrix([p.detach() for p in block.params])
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_changed_damping_remakes_the_inverses_between_inverse_steps():
    model, x, y = model_and_batch()
    opt = make(KFAC, model, inv_freq=4)
    for damping in (0.03, 0.3):
        opt.param_groups[0]["damping"] = damping
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = opt.block_state(opt.curvature.blocks[1])
    assert state["inverse_damping"] == 0.3
    eye = torch.eye(state["G_ea"].shape[0], dtype=torch.float64)
    pi = ((state["dA"].mean()) / (state["dG"].mean())).sqrt()  # the decomposition of step 0, not refreshed since
    g_made = state["QG"] @ torch.diag(state["dG"]) @ state["QG"].mT
    torch.testing.assert_close(torch.linalg.inv(state["G_inv"]), g_made + 0.3**0.5 / pi * eye, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM])
def test_a_factored_run_resumes_bit_identically(cls):
    model, _, _ = model_and_batch()
    opt = make(cls, model, inv_freq=3, rho=0.9)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
               for _ in range(7)]  # fmt: skip
    for k, (x, y) in enumerate(batches):
        if k == 4:
            twin_model = copy.deepcopy(model)
            twin = make(cls, twin_model, inv_freq=3, rho=0.9, damping_form="eigen")  # the checkpoint's form governs
            twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for net, optimizer in ((model, opt), (twin_model, twin)) if k >= 4 else ((model, opt),):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert twin.param_groups[0]["damping_form"] == "factored"
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_the_factored_form_differs_from_the_eigenvalue_damping_it_replaces():
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    for net, form in ((model, "factored"), (twin, "eigen")):
        opt = make(KFAC, net, damping_form=form)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert not torch.allclose(model[0].weight, twin[0].weight, rtol=1e-6, atol=0)


def test_a_bad_damping_form_is_refused_in_one_line():
    model, _, _ = model_and_batch()
    with pytest.raises(ValueError, match=r"Invalid damping_form: 'tikhonov'; expected one of \('eigen', 'factored'\)"):
        KFAC(model, damping_form="tikhonov")


def test_compiled_plain_steps_follow_the_eager_factored_trajectory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    twin = copy.deepcopy(model)
    options = dict(damping_form="factored", stat_freq=2, inv_freq=4, fisher="empirical")
    opt, eager = KFAC(model, **options), KFAC(twin, **options)
    compiled = opt.compiled_step()
    gen = torch.Generator().manual_seed(1)
    for _ in range(9):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        for net, optimizer, step in ((model, opt, compiled), (twin, eager, eager.step)):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
