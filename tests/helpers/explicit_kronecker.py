"""An independent, explicit-Kronecker re-implementation of docs/algorithms.md §1–§3 for a two-layer MLP (test oracle).

Factors come from per-sample quantities computed here by autograd, preconditioners are explicit inverses
of ``Y ⊗ X + δI`` (torch.kron, row-major vec), and each optimizer rule is written out from the spec.
"""

import math

import torch
import torch.nn.functional as F


def augmented(x):
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def mlp_forward(weights, x):
    """Pre-activations of Linear → tanh → Linear with augmented weights W̄ = [W, b]."""
    z1 = augmented(x) @ weights[0].T
    z2 = augmented(torch.tanh(z1)) @ weights[1].T
    return z1, z2


def explicit_factors(weights, x, y):
    """Per-layer ``(A, Γ)`` from explicit per-sample inputs ``ā_i`` and gradients ``g_i = ∂ℓ_i/∂z_i``."""
    m = x.shape[0]
    z1, z2 = mlp_forward([w.detach() for w in weights], x)
    z1 = z1.detach().requires_grad_()
    z2_from_z1 = augmented(torch.tanh(z1)) @ weights[1].detach().T
    per_sample = F.cross_entropy(z2_from_z1, y, reduction="none")
    g1, g2 = torch.autograd.grad(per_sample.sum(), [z1, z2_from_z1])
    inputs = [augmented(x), augmented(torch.tanh(z1.detach()))]
    return [(a.T @ a / m, g.T @ g / m) for a, g in zip(inputs, [g1, g2])]


def gradients(weights, x, y, weight_decay):
    w = [t.detach().clone().requires_grad_() for t in weights]
    _, z2 = mlp_forward(w, x)
    grads = torch.autograd.grad(F.cross_entropy(z2, y), w)
    return [g + weight_decay * t.detach() for g, t in zip(grads, w)]


def preconditioner(x_factor, y_factor, damping):
    big = torch.kron(y_factor, x_factor)
    return torch.linalg.inv(big + damping * torch.eye(big.shape[0], dtype=big.dtype))


def apply(p_matrix, v):
    return (p_matrix @ v.reshape(-1)).reshape(v.shape)


class ExplicitOptimizer:
    """Steps of ``kind`` in {"kfac", "so", "q"} on augmented weight matrices."""

    def __init__(
        self, kind, weights, lr, rho, damping, weight_decay, stat_freq, inv_freq, clip, momentum=0.0, step_cap=None
    ):
        self.kind, self.weights = kind, [w.detach().clone() for w in weights]
        self.rho, self.damping, self.wd, self.clip, self.momentum = rho, damping, weight_decay, clip, momentum
        self.stat_freq, self.inv_freq = stat_freq, inv_freq
        self.step_cap = step_cap  # Q: RMS(S) ≤ step_cap, the clip's τ lowered to step_cap / lr where τ lr exceeds it
        self.k, self.lr_prev = 0, None
        self.clip_engaged = False
        self.ea, self.local, self.precond = [None, None], [None, None], [None, None]
        self.snapshot = [None, None]  # Q: (Ā_j, Γ̄_j) of the last inverse step j
        self.g_hat, self.v_prev, self.m, self.buf = [None] * 2, [None] * 2, [None] * 2, [None] * 2

    def step(self, x, y, lr):
        rho = self.rho
        v = gradients(self.weights, x, y, self.wd)
        if self.k % self.stat_freq == 0:
            factors = explicit_factors(self.weights, x, y)
            for layer, (a, g) in enumerate(factors):
                old = (a, g) if self.ea[layer] is None else self.ea[layer]
                self.local[layer] = (a, g)
                self.ea[layer] = (rho * old[0] + (1 - rho) * a, rho * old[1] + (1 - rho) * g)
                if self.k % self.inv_freq == 0:
                    if self.kind == "q":
                        c = (1 - rho) + lr
                        x_f, y_f = rho * old[0] + c * a, rho * old[1] + c * g
                        self.snapshot[layer] = self.ea[layer]
                    else:
                        x_f, y_f = self.ea[layer]
                    self.precond[layer] = preconditioner(x_f, y_f, self.damping)
        if self.kind == "q" and self.k % self.inv_freq != 0:
            # docs/algorithms.md §2, eq. (20): Â_k = (1 + lr_k) Ā_j, Γ̂_k = (1 + lr_k) Γ̄_j with the last inverse
            # step's averages.
            for layer in range(2):
                a_bar, g_bar = self.snapshot[layer]
                self.precond[layer] = preconditioner((1 + lr) * a_bar, (1 + lr) * g_bar, self.damping)
        getattr(self, f"_{self.kind}")(v, lr)
        self.k, self.lr_prev = self.k + 1, lr

    def _clip_nu(self, directions, vectors, lr, threshold):
        if threshold is None:
            return 1.0
        total = sum(float((d * u).sum()) for d, u in zip(directions, vectors))
        nu = min(1.0, math.sqrt(threshold / (total * lr * lr)))
        self.clip_engaged |= nu < 1.0
        return nu

    def _kfac(self, v, lr):
        d = [apply(self.precond[layer], v[layer]) for layer in range(2)]
        nu = self._clip_nu(d, v, lr, self.clip)
        for layer in range(2):
            previous = 0.0 if self.buf[layer] is None else self.momentum * self.buf[layer]
            self.buf[layer] = previous + nu * d[layer]
            self.weights[layer] = self.weights[layer] - lr * (1 - self.momentum) * self.buf[layer]

    def _so(self, v, lr):
        coef = 0.0 if self.lr_prev is None else self.rho * self.lr_prev / lr
        u = [v[layer] if self.lr_prev is None else v[layer] - coef * self.v_prev[layer] for layer in range(2)]
        self.v_prev = v
        d = [apply(self.precond[layer], u[layer]) for layer in range(2)]
        nu = self._clip_nu(d, u, lr, self.clip)
        for layer in range(2):
            self.weights[layer] = self.weights[layer] - lr * nu * d[layer]

    def _q(self, v, lr):
        for layer in range(2):
            if self.lr_prev is None:
                self.g_hat[layer] = v[layer]
            else:
                ratio = self.lr_prev / lr
                residual = self.g_hat[layer] - self.v_prev[layer] - self.m[layer]
                self.g_hat[layer] = v[layer] + ratio * self.rho * residual
            self.v_prev[layer] = v[layer]
            s = -lr * apply(self.precond[layer], self.g_hat[layer])
            a_bar, g_bar = self.ea[layer] if self.k % self.inv_freq == 0 else self.snapshot[layer]
            self.m[layer] = -(1 / lr) * (torch.kron(g_bar, a_bar) @ s.reshape(-1)).reshape(s.shape)
            if self.clip is not None:
                tau = self.clip if self.step_cap is None else min(self.clip, self.step_cap / lr)
                rms = s.norm() / (lr * math.sqrt(s.numel()))
                self.clip_engaged |= float(rms) > tau
                s = s * min(1.0, tau / float(rms))
            self.weights[layer] = self.weights[layer] + s
