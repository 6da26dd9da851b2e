"""A small CNN, its batches, and an optimizer's trajectory over them (the backends' and options' tests)."""

import torch
import torch.nn.functional as F
from torch import nn


def model_and_batches(width=8, device="cpu", dtype=torch.float32):
    """A small CNN (three equal hidden Linear layers of ``width``) and 7 batches, on ``device`` in ``dtype``."""
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, width), nn.Tanh(),
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4),
    ).to(device=device, dtype=dtype)  # fmt: skip
    gen = torch.Generator().manual_seed(12)
    batches = [
        (
            torch.randn(10, 1, 6, 6, generator=gen, dtype=dtype).to(device),
            torch.randint(0, 4, (10,), generator=gen).to(device),
        )
        for _ in range(7)
    ]
    return model, batches


def trajectory(cls, backend, model, batches, **extra):
    torch.manual_seed(13)
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=4, backend=backend, **extra)
    params = []
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return params, opt
