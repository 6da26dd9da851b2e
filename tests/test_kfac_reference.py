"""The benchmark baseline computes the same function as KFAC (so speed comparisons are like for like)."""

import copy

import torch
import torch.nn.functional as F
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
