"""The options (kldwrm_fast/optim/options.py): every one is a param-group entry that state_dict carries, set on the
optimizer with the constructor's validation; and those of the paper's own code (docs/algorithms.md §1, §3, §6.4):
separate bias blocks, an eigenvalue floor, and K-FAC's KL clip on the Q step, each against an explicit float64
computation, across backends and a resume."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from helpers.trajectories import model_and_batches, trajectory
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature import DenseCurvature
from kldwrm_fast.optim import q as q_module

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]
PAPER_CODE = dict(bias="separate", eigenvalue_floor=1e-6)


GROUP_OPTIONS = {
    KFAC: {"check_numerics": False, "pack_statistics": False},
    QKLDWRM: {"check_numerics": False, "ghat_growth_limit": 7.0, "exact_damping_iterations": 3},
}


@pytest.mark.parametrize("cls", list(GROUP_OPTIONS))
def test_options_set_on_the_optimizer_are_saved_and_restored(cls):
    model, batches = model_and_batches()
    opt = cls(model, stat_freq=1, inv_freq=2)
    for name, value in GROUP_OPTIONS[cls].items():
        setattr(opt, name, value)
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    saved = opt.state_dict()
    assert all(saved["param_groups"][0][name] == value for name, value in GROUP_OPTIONS[cls].items())
    fresh = cls(copy.deepcopy(model), stat_freq=1, inv_freq=2)
    fresh.load_state_dict(saved)
    assert all(getattr(fresh, name) == value for name, value in GROUP_OPTIONS[cls].items())


@pytest.mark.parametrize(
    "cls, name, value, expected",
    [
        (KFAC, "check_numerics", 1, "True or False"),
        (QKLDWRM, "ghat_growth_limit", -1.0, "ghat_growth_limit > 0 or None"),
        (QKLDWRM, "exact_damping_iterations", 2.5, "an integer >= 0"),
    ],
)
def test_an_option_set_out_of_range_is_refused_with_one_line(cls, name, value, expected):
    model, _ = model_and_batches()
    opt = cls(model)
    before = getattr(opt, name)
    with pytest.raises(ValueError, match=f"^Invalid {name}: {value!r}; expected {expected}$"):
        setattr(opt, name, value)
    assert getattr(opt, name) == before


def test_a_checkpoint_without_the_newer_options_loads_with_the_optimizer_s_own():
    model, batches = model_and_batches()
    opt = QKLDWRM(model, stat_freq=1, inv_freq=2)
    x, y = batches[0]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for name in ("check_numerics", "pack_statistics", "ghat_growth_limit", "exact_damping_iterations"):
            del group[name]
    fresh = QKLDWRM(copy.deepcopy(model), stat_freq=1, inv_freq=2)
    fresh.ghat_growth_limit = 9.0
    fresh.load_state_dict(saved)
    assert fresh.ghat_growth_limit == 9.0 and fresh.check_numerics is True
    assert fresh.param_groups[0]["exact_damping_iterations"] == 50 and fresh.param_groups[0]["pack_statistics"]
    fresh.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fresh.step()


def test_an_option_set_on_the_optimizer_leaves_the_routed_groups_alone():
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3))
    opt = KFAC(model, others=torch.optim.AdamW)
    opt.check_numerics = False
    own, routed = opt.param_groups[0], opt.param_groups[1]
    assert own["check_numerics"] is False and "check_numerics" not in routed


def damped_solve(factor_out, factor_in, gradient, damping):
    """``(Γ ⊗ A + δI)⁻¹`` applied to a row-major (n_out, n_in) gradient, densely."""
    n_out, n_in = gradient.shape
    dense = torch.kron(factor_out, factor_in) + damping * torch.eye(n_out * n_in, dtype=gradient.dtype)
    return torch.linalg.solve(dense, gradient.reshape(-1)).reshape(n_out, n_in)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_a_separate_bias_is_its_own_block_of_the_explicit_kronecker_fisher(layer):
    torch.manual_seed(0)
    module = nn.Linear(4, 3) if layer == "linear" else nn.Conv2d(2, 3, 3, padding=1)
    module = module.double()
    x = torch.randn(6, 4, dtype=torch.float64) if layer == "linear" else torch.randn(6, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    twin = copy.deepcopy(module)
    lr, damping = 0.1, 0.01
    opt = KFAC(module, lr=lr, damping=damping, momentum=0.0, kl_clip=None, stat_freq=1, inv_freq=1,
               fisher="empirical", **PAPER_CODE)  # fmt: skip
    assert [block.name for block in opt.curvature.blocks] == [
        "the model's own " + type(module).__name__, "the model's own " + type(module).__name__ + " (bias)",
    ]  # fmt: skip

    def loss_of(net, output):
        logits = output if layer == "linear" else output.mean(dim=(2, 3))
        return F.cross_entropy(logits, y)

    output = module(x)
    loss_of(module, output).backward()
    opt.step()

    # The explicit computation, from the twin: local factors (ρ irrelevant at the first step), damped solves.
    out = twin(x)
    out.retain_grad()
    loss_of(twin, out).backward()
    m = x.shape[0]
    if layer == "linear":
        rows_a, rows_e, bias_e = x, out.grad, out.grad
    else:
        rows_a = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
        rows_e = out.grad.permute(0, 2, 3, 1).reshape(-1, 3)
        bias_e = out.grad.sum(dim=(2, 3))  # the bias gradient of each sample
    a = rows_a.T @ rows_a / rows_a.shape[0]
    gamma = m * rows_e.T @ rows_e
    gamma_bias = m * bias_e.T @ bias_e
    weight_grad = twin.weight.grad.reshape(3, -1)
    expected_weight = twin.weight.detach().reshape(3, -1) - lr * damped_solve(gamma, a, weight_grad, damping)
    one = torch.ones(1, 1, dtype=torch.float64)
    expected_bias = twin.bias.detach() - lr * damped_solve(gamma_bias, one, twin.bias.grad.unsqueeze(1), damping)[:, 0]
    torch.testing.assert_close(module.weight.detach().reshape(3, -1), expected_weight, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(module.bias.detach(), expected_bias, rtol=1e-10, atol=1e-12)


def test_the_eigenvalue_floor_zeroes_small_eigenvalues_before_damping():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = KFAC(model, stat_freq=1, inv_freq=1, eigenvalue_floor=1e-3)
    x, y = torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 3, (4,))  # rank-4 input factor of size 13
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.block_states()[0]
    raw = torch.linalg.eigvalsh(state["A_ea"])
    assert torch.equal(state["dA"] == 0, raw < 1e-3) and (state["dA"] == 0).sum() >= 9
    torch.testing.assert_close(state["dA"][raw >= 1e-3], raw[raw >= 1e-3], rtol=1e-10, atol=0)


def dense_problem():
    torch.manual_seed(3)
    params = [torch.randn(5, dtype=torch.float64, requires_grad=True)]
    rows = torch.randn(9, 5, dtype=torch.float64)
    return params, lambda: (rows, 1.0 / 9)


@pytest.mark.parametrize("cadence", [(1, 1), (1, 3), (2, 2)])
def test_the_q_step_is_kl_clipped_by_the_factor_of_k_fac_s_rule(cadence, monkeypatch):
    """Q on an exact curvature with given gradients, unclipped and KL-clipped: at every step, in either basis, the
    clipped move is ``ν = min(1, sqrt(kl_clip / (lr² Σ⟨P(Ĝ), Ĝ⟩)))`` times the unclipped ``S = −lr P(Ĝ)``, with
    ``Ĝ`` taken back to the parameter basis here; the recursion (``M`` from the unclipped ``S``) is undisturbed."""
    lr, kl_clip = 0.1, 1e-6
    recorded = []
    original = q_module.kl_clip_steps

    def recording(clip, batches, ops, states, steps, g_hats, step_lr, in_eigenbasis):
        if clip > 1:  # the reference run: record S and Ĝ in the parameter basis, scale by 1
            g = [s["QG"] @ g @ s["QA"].T if in_eigenbasis else g for s, g in zip(states, g_hats)]
            recorded.append((steps[0].clone(), g[0].clone()))
        return original(clip, batches, ops, states, steps, g_hats, step_lr, in_eigenbasis)

    monkeypatch.setattr(q_module, "kl_clip_steps", recording)
    runs = []
    for threshold in (1e30, kl_clip):
        params, rows = dense_problem()
        opt = QKLDWRM(DenseCurvature(params, rows), lr=lr, clip=None, kl_clip=threshold, stat_freq=cadence[0],
                      inv_freq=cadence[1])  # fmt: skip
        moves = []
        for k in range(6):
            gen = torch.Generator().manual_seed(k)
            params[0].grad = torch.randn(5, dtype=torch.float64, generator=gen)
            before = params[0].detach().clone()
            opt.step()
            moves.append(params[0].detach() - before)
        runs.append(moves)
    active = 0
    for (free, clipped), (step, g_hat) in zip(zip(*runs), recorded):
        torch.testing.assert_close(free, step.reshape(-1), rtol=1e-12, atol=1e-15)
        nu = min(1.0, (kl_clip / (-lr * torch.vdot(step.reshape(-1), g_hat.reshape(-1)).item())) ** 0.5)
        torch.testing.assert_close(clipped, nu * free, rtol=1e-9, atol=1e-15)
        active += nu < 0.999
    assert active >= 3


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter"
)
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_paper_code_options_follow_the_torch_trajectory_on_triton(cls):
    pytest.importorskip("triton")
    extra = dict(PAPER_CODE, **(dict(kl_clip=0.1) if cls in (QKLDWRM, QEKLDWRM) else {}))
    extra.update(n_inner=2) if cls is QEKLDWRM else None
    model, batches = model_and_batches(dtype=torch.float64)
    reference, _ = trajectory(cls, "torch", copy.deepcopy(model), batches, **extra)
    ours, _ = trajectory(cls, "triton", model, batches, **extra)
    for a, b in zip(ours, reference):
        assert (a - b).norm() <= 1e-10 * b.norm()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_paper_code_options_resume_bit_identically(cls):
    extra = dict(PAPER_CODE, **(dict(kl_clip=0.1) if cls in (QKLDWRM, QEKLDWRM) else {}))
    model, batches = model_and_batches()
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=4, **extra)
    for k, (x, y) in enumerate(batches):
        if k == 3:
            twin_model = copy.deepcopy(model)
            twin = cls(twin_model, lr=0.05, stat_freq=2, inv_freq=4, **extra)
            twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for net, optimizer in ((model, opt), (twin_model, twin)) if k >= 3 else ((model, opt),):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="saved with bias='separate'"):
        cls(copy.deepcopy(model), lr=0.05).load_state_dict(opt.state_dict())
