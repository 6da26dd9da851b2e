"""A small float MLP, its batches and a training loop that the robustness, checkpoint and user-model tests share."""

import torch
import torch.nn.functional as F
from torch import nn


def small_model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def small_batch(k):
    """Batch ``k`` for :func:`small_model`: 16 inputs of 5 features, 3 classes."""
    gen = torch.Generator().manual_seed(k)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train_steps(opt, model, steps):
    """One cross-entropy step of ``opt`` on :func:`small_batch` ``k`` for each ``k`` in ``steps``."""
    for k in steps:
        x, y = small_batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
