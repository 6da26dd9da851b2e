"""Kronecker factors, preconditioning and the Q products against explicit per-sample / Kronecker math."""

import pytest
import torch
import torch.nn.functional as F
from helpers.explicit_kronecker import ExplicitOptimizer, explicit_factors
from helpers.matrices import spd
from torch import nn

from kldwrm_fast import KFAC, QKLDWRM, SOKLDWRM
from kldwrm_fast.ops import reference


def mlp(dtype=torch.float64):
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def augmented_weights(net):
    return [torch.cat([layer.weight, layer.bias[:, None]], 1).detach() for layer in (net[0], net[2])]


def one_step(opt, net, x, y):
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()


def test_linear_factors_equal_explicit_per_sample_factors():
    net = mlp()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    expected = explicit_factors(augmented_weights(net), x, y)
    opt = KFAC(net, fisher="empirical", stat_freq=1, inv_freq=1)
    one_step(opt, net, x, y)
    for layer, (a, g) in zip((net[0], net[2]), expected):
        state = opt.state[layer.weight]
        torch.testing.assert_close(state["A"], a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["G"], g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state["A_ea"], a, rtol=1e-12, atol=1e-14)


def test_linear_rows_flatten_extra_leading_dimensions():
    layer = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    opt = KFAC(layer, fisher="empirical", stat_freq=1, inv_freq=1)
    opt.zero_grad()
    z = layer(x)
    z.pow(2).mean().backward()
    opt.step()
    rows = torch.cat([x.reshape(10, 4), torch.ones(10, 1, dtype=torch.float64)], 1)
    per_row = 2 * z.detach().reshape(10, 3) / 3  # gradient of each row's own loss, mean over 3 outputs
    torch.testing.assert_close(opt.state[layer.weight]["A"], rows.T @ rows / 10)
    torch.testing.assert_close(opt.state[layer.weight]["G"], per_row.T @ per_row / 10)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_covering_its_whole_input_gives_the_linear_factors_and_steps(bias):
    conv = nn.Conv2d(2, 3, kernel_size=4, bias=bias).double()
    linear = nn.Linear(32, 3, bias=bias).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.reshape(3, -1))
        if bias:
            linear.bias.copy_(conv.bias)
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    models = [nn.Sequential(conv, nn.Flatten()), nn.Sequential(nn.Flatten(), linear)]
    opts = [QKLDWRM(m, lr=0.1, fisher="empirical", stat_freq=1, inv_freq=1) for m in models]
    for _ in range(3):
        for opt, model in zip(opts, models):
            one_step(opt, model, x, y)
    conv_state, linear_state = opts[0].state[conv.weight], opts[1].state[linear.weight]
    for key in ("A", "G", "A_ea", "G_ea", "g_hat", "m"):
        torch.testing.assert_close(conv_state[key], linear_state[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv.weight.reshape(3, -1), linear.weight, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_out,n_in", [(1, 1), (3, 5), (4, 2)])
def test_preconditioning_equals_the_explicit_damped_kronecker_inverse(n_out, n_in):
    gen = torch.Generator().manual_seed(n_out * 10 + n_in)
    x, yf = spd(n_in, generator=gen), spd(n_out, generator=gen)
    v = torch.randn(n_out, n_in, dtype=torch.float64, generator=gen)
    damping = 0.03
    d_x, q_x = torch.linalg.eigh(x)
    d_y, q_y = torch.linalg.eigh(yf)
    result = reference.precondition(q_y, d_y, q_x, d_x, v, damping)
    big = torch.kron(yf, x) + damping * torch.eye(n_out * n_in, dtype=torch.float64)
    expected = torch.linalg.solve(big, v.reshape(-1)).reshape(n_out, n_in)
    torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-13)


def test_reweighted_factors_and_q_products_match_s82_to_s87():
    gen = torch.Generator().manual_seed(3)
    rho, lr, n_in, n_out = 0.6, 0.2, 3, 2
    c = (1 - rho) + lr
    a_ea, g_ea = torch.zeros(n_in, n_in, dtype=torch.float64), torch.zeros(n_out, n_out, dtype=torch.float64)
    a_locals, g_locals = [], []
    for k in range(4):
        xa = torch.randn(7, n_in, dtype=torch.float64, generator=gen)
        xg = torch.randn(7, n_out, dtype=torch.float64, generator=gen)
        a_old, g_old = a_ea.clone(), g_ea.clone()
        a_hat, g_hat = torch.empty_like(a_ea), torch.empty_like(g_ea)
        a_loc = reference.factor_update(xa, a_ea, a_hat, 1 / 7, rho, c, k == 0, True)
        g_loc = reference.factor_update(xg, g_ea, g_hat, 2.0, rho, c, k == 0, True)
        a_locals.append(xa.T @ xa / 7)
        g_locals.append(2.0 * xg.T @ xg)
        torch.testing.assert_close(a_loc, a_locals[-1])
        torch.testing.assert_close(g_loc, g_locals[-1])
        if k == 0:
            a_old, g_old = a_locals[0], g_locals[0]
        torch.testing.assert_close(a_hat, rho * a_old + c * a_locals[-1])  # (S82)
        torch.testing.assert_close(g_hat, rho * g_old + c * g_locals[-1])  # (S83)
    closed_form = rho**3 * a_locals[0] + (1 - rho) * sum(rho ** (3 - i) * a_locals[i] for i in range(1, 4))
    torch.testing.assert_close(a_ea, closed_form)  # (13)/(S84)

    v = torch.randn(n_out, n_in, dtype=torch.float64, generator=gen)
    d_a, q_a = torch.linalg.eigh(a_hat)
    d_g, q_g = torch.linalg.eigh(g_hat)
    step, product = reference.q_precondition(q_g, d_g, q_a, d_a, v, 0.0, lr, g_ea, a_ea)
    hat_inverse = torch.linalg.inv(torch.kron(g_hat, a_hat))
    torch.testing.assert_close(step.reshape(-1), -lr * hat_inverse @ v.reshape(-1))  # (S89)
    expected_m = torch.kron(g_ea, a_ea) @ hat_inverse @ v.reshape(-1)  # (S86)–(S87)
    torch.testing.assert_close(product.reshape(-1), expected_m)


@pytest.mark.parametrize(
    "cls,kind,extra",
    [
        (KFAC, "kfac", dict(momentum=0.8, kl_clip=1e-3)),
        (SOKLDWRM, "so", dict(kl_clip=1e-3)),
        (QKLDWRM, "q", dict(clip=0.5, max_step_rms=None)),
        (QKLDWRM, "q", dict(clip=2.0, max_step_rms=0.1)),  # the step cap binds: τ lr = 0.6·0.9^k > 0.1
    ],
)
@pytest.mark.parametrize("stat_freq,inv_freq", [(2, 4), (2, 2), (4, 4)])
def test_optimizer_trajectory_equals_explicit_kronecker_reimplementation(cls, kind, extra, stat_freq, inv_freq):
    net = mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(9)
    ]
    lrs = [0.3 * 0.9**k for k in range(9)]
    hyper = dict(rho=0.7, damping=0.02, weight_decay=0.01, stat_freq=stat_freq, inv_freq=inv_freq)
    opt = cls(net, lr=lrs[0], fisher="empirical", **hyper, **extra)
    clip = extra.get("kl_clip", extra.get("clip"))
    explicit = ExplicitOptimizer(kind, augmented_weights(net), lrs[0], hyper["rho"], hyper["damping"],
                                 hyper["weight_decay"], hyper["stat_freq"], hyper["inv_freq"], clip,
                                 extra.get("momentum", 0.0), extra.get("max_step_rms"))  # fmt: skip
    for (x, y), lr in zip(batches, lrs):
        opt.param_groups[0]["lr"] = lr
        one_step(opt, net, x, y)
        explicit.step(x, y, lr)
        for ours, theirs in zip(augmented_weights(net), explicit.weights):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert explicit.clip_engaged, "the thresholds must be small enough that clipping is exercised"


def test_sampled_fisher_output_factor_has_the_right_expectation():
    """Γ of the output layer from sampled labels → E_x[diag(p) − ppᵀ] (categorical) and I (Gaussian)."""
    torch.manual_seed(5)
    x = torch.randn(40000, 3, dtype=torch.float64)
    for predictive in ("categorical", "gaussian"):
        layer = nn.Linear(3, 4).double()
        opt = KFAC(layer, predictive=predictive, stat_freq=1, inv_freq=1)
        out = layer(x)
        out.sum().backward()
        opt.step()
        if predictive == "categorical":
            p = torch.softmax(out.detach(), 1)
            expected = torch.diag(p.mean(0)) - p.T @ p / len(p)
        else:
            expected = torch.eye(4, dtype=torch.float64)
        torch.testing.assert_close(opt.state[layer.weight]["G"], expected, rtol=0, atol=0.03)
