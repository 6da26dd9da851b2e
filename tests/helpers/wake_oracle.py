"""The recursive steps equal the minimisers of the paper's wake objectives (Props. 3.1, 4.1, 4.2, A.1).

Exact float64 setting: a tiny tanh network, the exact Fisher of a unit-variance Gaussian model at every
iterate (a DenseCurvature, so no Kronecker approximation), damping 0, no clipping, no momentum. The
oracle minimises each objective, written literally as a function of s over the stored history
(g_i, F_i, s_i, λ_i), by one dense linear solve of its gradient (Hessian and gradient by autograd).
"""

import torch
from torch import nn
from torch.func import functional_call

from kldwrm_fast.curvature import DenseCurvature

N_SAMPLES, N_STEPS = 24, 12


def make_problem(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(N_SAMPLES, 3, dtype=torch.float64)
    y = torch.randn(N_SAMPLES, 2, dtype=torch.float64)
    names = [name for name, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]

    def jacobian_rows():
        def outputs(*values):
            return functional_call(net, dict(zip(names, values)), (x,))

        jac = torch.autograd.functional.jacobian(outputs, tuple(p.detach() for p in params))
        return torch.cat([j.reshape(N_SAMPLES * 2, -1) for j in jac], dim=1), 1.0 / N_SAMPLES

    def loss():
        return 0.5 * (net(x) - y).pow(2).sum(dim=1).mean()

    return net, params, jacobian_rows, loss


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def run(optimizer_cls, lrs, stat_freq=1, **kwargs):
    """Run the optimizer with the exact Fisher; return the history [(g_k, F_k, s_k, lr_k, fresh_k)]."""
    net, params, jacobian_rows, loss = make_problem()
    opt = optimizer_cls(
        DenseCurvature(params, jacobian_rows), lr=lrs[0], damping=0.0,
        stat_freq=stat_freq, inv_freq=stat_freq, **kwargs,
    )  # fmt: skip
    history = []
    for k, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        theta = flat(params).detach().clone()
        opt.zero_grad()
        loss().backward()
        g = flat([p.grad for p in params]).clone()
        rows, scale = jacobian_rows()
        fisher = scale * rows.T @ rows
        opt.step()
        history.append((g, fisher, flat(params).detach() - theta, lr, k % stat_freq == 0))
    return history


def effective_fishers(history, rho):
    """F_i of the wake, with eq. (20) on steps without new statistics: F_i = F̄_{i−1}."""
    fishers, average = [], None
    for _, fisher, _, _, fresh in history:
        local = fisher if fresh else average
        average = local if average is None else rho * average + (1 - rho) * local
        fishers.append(local)
    return fishers


def minimise(objective, n):
    """Minimiser of a strictly convex quadratic objective(s) by one dense linear solve."""
    zero = torch.zeros(n, dtype=torch.float64)
    hessian = torch.func.hessian(objective)(zero)
    gradient = torch.func.grad(objective)(zero)
    return torch.linalg.solve(hessian, -gradient)


def kappa(i, rho):
    return 1.0 if i == 0 else 1.0 - rho


def wake_offset(steps, i, k):
    """σ_i = Σ_{j=i}^{k−1} s_j (zero for i = k)."""
    return sum((steps[j] for j in range(i, k)), torch.zeros_like(steps[0]))


def assert_close_relative(actual, expected, tol=1e-10):
    error = (actual - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.3e}"


def check_wake(history, objective_at):
    steps = [h[2] for h in history]
    for k in range(len(history)):
        expected = minimise(lambda s: objective_at(k, s, steps), steps[0].numel())
        assert_close_relative(steps[k], expected)


def kl_wake(k, s, steps, fishers, rho, lam):
    """λ Σ_i κ(i) ρ^{k−i} D̃(θ_i, θ_k + s) with D̃ of (21)."""
    total = 0.0
    for i in range(k + 1):
        point = s + wake_offset(steps, i, k)
        total = total + kappa(i, rho) * rho ** (k - i) * 0.5 * point @ fishers[i] @ point
    return lam * total
