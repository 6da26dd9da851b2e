"""KFAC (docs/algorithms.md §3 "KFAC"): its step is the minimiser of the wake of quadratic models (Prop. 3.1), and the
benchmark baseline written like the paper's code computes the same function (so speed comparisons are like for
like). The Kronecker path against an explicit re-implementation is in ``tests/curvature/test_kronecker.py``."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.wake_oracle import N_STEPS, check_wake, effective_fishers, kappa, run, wake_offset
from torch import nn

from kldwrm_fast import KFAC
from kldwrm_fast.baselines import ReferenceKFAC


def test_reference_kfac_follows_the_kfac_trajectory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 5)).double()
    twin = copy.deepcopy(model)
    hyper = dict(lr=0.05, rho=0.9, damping=0.01, momentum=0.8, kl_clip=1e-3, weight_decay=1e-3, stat_freq=2, inv_freq=4)
    ours = KFAC(model, fisher="empirical", **hyper)
    reference = ReferenceKFAC(twin, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(9):
        x = torch.randn(8, 1, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 5, (8,), generator=gen)
        for opt, net in ((ours, model), (reference, twin)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stat_freq", [1, 3])
def test_prop_3_1_ea_natural_gradient_is_the_wake_of_quadratic_models(stat_freq):
    rho, lr = 0.7, 0.05
    history = run(KFAC, [lr] * N_STEPS, stat_freq=stat_freq, rho=rho, momentum=0.0, kl_clip=None)
    fishers = effective_fishers(history, rho)
    lam = 1.0 / lr

    def objective(k, s, steps):  # (15) with λ_0 = λ, λ_i = (1−ρ)λ, (16)
        total = 0.0
        for i in range(k + 1):
            g_i, lam_i = history[i][0], lam * kappa(i, rho)
            point = s + wake_offset(steps, i, k)
            total = total + rho ** (k - i) * (g_i @ point + 0.5 * lam_i * point @ fishers[i] @ point)
        return total

    check_wake(history, objective)
