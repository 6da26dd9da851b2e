"""The three benchmark workloads of issue 6, at full size (GPU) or reduced size (CPU)."""

from __future__ import annotations

import torch
from torch import nn

from kldwrm_fast.experiments.models import paper_cnn


def mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10),
    )  # fmt: skip


def wide_cnn(c1: int, c2: int, c3: int, hidden: int) -> nn.Module:
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, c1), *block(c1, c2), *block(c2, c3), nn.Flatten(),
        nn.Linear(c3 * 16, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )  # fmt: skip


# name: (model builder, input shape without batch, batch) at full and reduced size
WORKLOADS = {
    "paper-cnn": {True: (paper_cnn, (1, 28, 28), 512), False: (paper_cnn, (1, 28, 28), 128)},
    "mlp": {True: (lambda: mlp(2048), (1, 28, 28), 1024), False: (lambda: mlp(512), (1, 28, 28), 256)},
    "wide-cnn": {
        True: (lambda: wide_cnn(64, 128, 256, 512), (3, 32, 32), 256),
        False: (lambda: wide_cnn(16, 32, 64, 128), (3, 32, 32), 64),
    },
}


def build(name: str, full: bool, device: torch.device):
    """``(model, x, y)`` for a workload, seeded."""
    make, shape, batch = WORKLOADS[name][full]
    torch.manual_seed(0)
    model = make().to(device)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y
