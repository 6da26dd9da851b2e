"""Data-parallel support on ``torch.distributed`` (DDP models, ``torchrun``; gloo on CPU, NCCL on GPU).

What crosses the network per step, with ``n_l`` the sizes of the Kronecker factors (``n_in + 1`` and
``n_out`` of every layer) and 4 bytes per float32 value:

* statistics steps: one all-reduce (sum) of the new local factors, packed as upper triangles:
  ``4 · Σ_l n_l (n_l + 1) / 2`` bytes (``pack=False``: ``4 · Σ_l n_l²``);
* inverse steps: each factor's eigendecomposition is broadcast from the one rank that computed it:
  ``4 · Σ_l (n_l² + n_l)`` bytes in all;
* QE-KLD-WRM: one all-reduce of the inner-solver gradient (one parameter copy) per inner step.

Gradients themselves are averaged by DDP as usual. Because every exponential average of docs/algorithms.md §2 is linear
in the statistics, averaging the ranks' local factors equals the factors of the concatenated batch (for
equal local batches), and every rank then computes identical steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DataParallel:
    """The process group an optimizer cooperates over (``world_size == 1``: a single process)."""

    world_size: int = 1
    rank: int = 0
    group: Optional[object] = None

    @property
    def active(self) -> bool:
        return self.world_size > 1


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` or ``nn.DataParallel`` wrapper, or ``model`` itself."""
    return model.module if is_ddp(model) or isinstance(model, nn.DataParallel) else model


def data_parallel_for(model) -> DataParallel:
    """The data-parallel context for ``model``: active when the default process group has several ranks."""
    initialised = dist.is_available() and dist.is_initialized()
    if is_ddp(model) and not initialised:
        raise RuntimeError(
            "the model is wrapped in DistributedDataParallel but no process group is initialised; call "
            "torch.distributed.init_process_group (torchrun sets up the environment) before the optimizer"
        )
    if not initialised:
        return DataParallel()
    return DataParallel(dist.get_world_size(), dist.get_rank())


def average_symmetric_(matrices: list[Tensor], pack: bool = True) -> None:
    """Average symmetric matrices over all ranks in place with one all-reduce per dtype and device.

    With ``pack`` only upper triangles travel (about half the bytes) and are mirrored back. A vector (a diagonal
    side's factor) travels whole.
    """
    world = dist.get_world_size()
    buckets: dict[tuple, list[Tensor]] = {}
    for matrix in matrices:
        buckets.setdefault((matrix.dtype, matrix.device), []).append(matrix)
    for bucket in buckets.values():
        pieces = []
        for matrix in bucket:
            if pack and matrix.dim() == 2:
                rows, cols = torch.triu_indices(*matrix.shape, device=matrix.device)
                pieces.append(matrix[rows, cols])
            else:
                pieces.append(matrix.reshape(-1))
        flat = torch.cat(pieces)
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for matrix, piece in zip(bucket, pieces):
            values = flat[offset : offset + piece.numel()]
            offset += piece.numel()
            if pack and matrix.dim() == 2:
                rows, cols = torch.triu_indices(*matrix.shape, device=matrix.device)
                matrix[rows, cols] = values
                matrix[cols, rows] = values
            else:
                matrix.copy_(values.view_as(matrix))


def assign_by_cost(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each factor for eigendecomposition: largest first (cost ∝ n³), to the least-loaded rank.

    Deterministic, so every rank computes the same assignment without communicating.
    """
    loads = [0.0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += float(sizes[index]) ** 3
    return owners


def average_(tensors: list[Tensor]) -> None:
    """Average tensors over all ranks in place (one flat all-reduce)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
