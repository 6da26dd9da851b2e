"""A model whose eigensolver size groups match a block-batch group, and eigensolvers returning their eigenvectors
in odd strided layouts (the solver-layout tests, here and on a GPU)."""

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(3, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.last = nn.Linear(6, 4)  # applied to (batch, 2, 6): its factors are 7×7 and 4×4

    def forward(self, x):
        h = torch.tanh(self.third(torch.tanh(self.second(torch.tanh(self.first(x))))))
        return self.last(h.view(-1, 2, 6)).flatten(1)


def transposed_buffer(q):
    """Q as the transposed view of a row-major buffer holding Qᵀ (what ``eigh_cuda`` returned before)."""
    buffer = torch.empty(q.shape, dtype=q.dtype)
    buffer.copy_(q.mT)
    return buffer.mT


def batch_inner_buffer(q):
    """Q as a view of a (n, batch, n) buffer: batch not outermost in memory."""
    return q.permute(1, 0, 2).contiguous().permute(1, 0, 2)


def padded_buffer(q):
    """Q as a view into a wider, padded buffer."""
    buffer = torch.zeros(*q.shape[:-1], q.shape[-1] + 3, dtype=q.dtype)
    buffer[..., : q.shape[-1]] = q
    return buffer[..., : q.shape[-1]]


def solver_returning(layout):
    def solver(stack):
        values, vectors = torch.linalg.eigh(stack)
        return values, layout(vectors), torch.zeros(stack.shape[0], dtype=torch.int32)

    return solver


def run(cls, model, batches, solver=None, batched=True, **options):
    torch.manual_seed(5)
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=1, **options)
    if solver is not None:
        opt._ops = dataclasses.replace(opt._ops, eigh=solver, takes_unbatched=False)
    if not batched:
        opt._batches.groups = [[i] for i in range(len(opt.curvature.blocks))]
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt, torch.cat([p.detach().reshape(-1) for p in model.parameters()])
