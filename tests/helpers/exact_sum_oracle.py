"""``curvature_sum="exact"``: Q-KLD-WRM with the two-term Kronecker sum of eq. (81) inverted exactly (the paper's
"approach 1"), checked against dense solves built with ``torch.kron`` (docs/algorithms.md §3).

Oracle, float64, per layer (row-major vec, so ``vec(Γ S A) = (Γ ⊗ A) vec(S)``): with the factors the optimizer
recorded, ``F̄_j = Γ̄_j ⊗ Ā_j`` (eq. (78)) and ``B_k = Γ_k ⊗ A_k`` (eq. (79); on a step without new statistics
``B_k = F̄_q``, eq. (20)), the Q step at k minimises (101)/(102)::

    ⟨ĝ_k, s⟩ + (λ_k/2) sᵀ (F̄_k + B_k/λ_k + δ I) s,     ĝ_k = g_k + λ_k Σ_{j<k} ρ^{k−j} F̄_j s_j

written over the recorded history (the steps s_j actually taken), not by the recursion the optimizer runs.
"""

import torch
from torch import nn

from kldwrm_fast import QKLDWRM

N_STEPS, RHO = 10, 0.5


def make_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(24, 3, dtype=torch.float64)
    y = torch.randn(24, 2, dtype=torch.float64)
    return net, x, y


def block_form(layer, tensors):
    weight, bias = tensors
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def record(lrs, cadence, damping, curvature_sum, iterations=50, eval_steps=()):
    """Run Q on the tiny network; per step and layer ``(V, S, Γ, A, Γ̄, Ā, lr)`` (local factors as used).

    With damping, the conjugate gradients run to rounding level (the largest layer has 16 unknowns). Steps in
    ``eval_steps`` run the forward in eval mode: nothing is captured, so a due step has no new statistics and
    no decomposition (eq. (20) holds with the last inverse step's averages)."""
    net, x, y = make_model()
    opt = QKLDWRM(
        net, lr=lrs[0], rho=RHO, damping=damping, clip=None, stat_freq=cadence, inv_freq=cadence,
        fisher="empirical", predictive="gaussian", curvature_sum=curvature_sum,
    )  # fmt: skip
    opt.exact_damping_iterations = iterations
    layers = [net[0], net[2]]
    history = []
    for k, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        before = [block_form(layer, [layer.weight.detach().clone(), layer.bias.detach().clone()]) for layer in layers]
        opt.zero_grad()
        net.train(k not in eval_steps)
        (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
        grads = [block_form(layer, [layer.weight.grad.clone(), layer.bias.grad.clone()]) for layer in layers]
        opt.step()
        fresh = k % cadence == 0 and k not in eval_steps
        entry = []
        for layer, v, old in zip(layers, grads, before):
            state = opt.state[layer.weight]
            g_ea, a_ea = state["G_ea"].clone(), state["A_ea"].clone()
            local = (state["G"].clone(), state["A"].clone()) if fresh else (g_ea, a_ea)
            step = block_form(layer, [layer.weight.detach(), layer.bias.detach()]) - old
            entry.append((v, step, *local, g_ea, a_ea, lr))
        history.append(entry)
    opt.remove_hooks()
    return history


def oracle_step(history, k, layer, damping):
    """The minimiser of (102) for one layer at step k (module docstring), by a dense solve."""
    v, _, g_local, a_local, g_ea, a_ea, lr = history[k][layer]
    g_hat = v.reshape(-1).clone()
    for j in range(k):
        _, s_j, _, _, g_ea_j, a_ea_j, _ = history[j][layer]
        g_hat += (1.0 / lr) * RHO ** (k - j) * (torch.kron(g_ea_j, a_ea_j) @ s_j.reshape(-1))
    n = g_hat.numel()
    system = torch.kron(g_ea, a_ea) + lr * torch.kron(g_local, a_local) + damping * torch.eye(n, dtype=g_hat.dtype)
    return (-lr * torch.linalg.solve(system, g_hat)).reshape(v.shape)


def relative_errors(history, damping, steps=None):
    """Per step, the largest relative error of a layer's step against the oracle."""
    errors = []
    for k in range(len(history)) if steps is None else steps:
        worst = 0.0
        for layer in range(len(history[k])):
            expected = oracle_step(history, k, layer, damping)
            worst = max(worst, ((history[k][layer][1] - expected).norm() / expected.norm()).item())
        errors.append(worst)
    return errors


LRS = {"fixed": [0.05] * N_STEPS, "varying": [0.05 * 1.15**k for k in range(N_STEPS)]}
