"""Parameter updates and the pieces of the update rules the optimizers share: the KL clip, the recursions' λ-ratio,
heavy-ball momentum, and plain gradient descent (docs/algorithms.md §3). Every write goes through the step's
verdict (:meth:`~kldwrm_fast.optim.numerics.Numerics.mask`)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature import factored, lowrank
from kldwrm_fast.ops import reference, tracing
from kldwrm_fast.optim.numerics import Numerics


def recursion_ratio(rho: float, lr_prev: Optional[float], lr: float) -> float:
    """``ρ λ_k/λ_{k−1} = ρ lr_{k−1}/lr_k``, the coefficient of SO's and Q's recursions; 0 when either lr is 0 or there
    is no previous step (Note [zero learning rate] in :mod:`kldwrm_fast.optim.base`): the recursion restarts."""
    return rho * lr_prev / lr if lr_prev and lr else 0.0


def preconditioned(ops, group: dict, plan, states: list[dict], vs: list[Tensor]) -> list[Tensor]:
    """``P(V)`` for the plan's blocks (KFAC, SO): the eigenbasis form with the damping on eigenvalue products, or with
    ``damping_form="factored"`` the cached damped inverses of :mod:`kldwrm_fast.curvature.factored`, or with
    low-rank sides the form of :mod:`kldwrm_fast.curvature.lowrank` (PyTorch operations on every backend). The form
    follows the stored decompositions, so a ``rank`` or ``damping_form`` changed between steps takes effect when the
    next inverse step has made the decompositions it needs."""
    if lowrank.present(states):
        return lowrank.precondition(states, vs, group["damping"])
    if group["damping_form"] == "factored":
        factored.refresh_inverses(states, group["damping"], plan.inverse_due)
        return factored.precondition(states, vs)
    return plan.batches.precondition(ops, states, vs, group["damping"])


def add_to_parameters(blocks, updates: list[Tensor], alpha: float, numerics: Numerics) -> None:
    """``W̄ ← W̄ + alpha · U`` for every block (block form ``updates``, any float dtype, rounded once to the
    parameters' dtype), in one multi-tensor operation; the updates are masked by the step's verdict first."""
    params, parts = [], []
    for block, update in zip(blocks, updates, strict=True):
        params += block.params
        parts += block.unflatten(numerics.mask(update))
    reference.scaled_add_(params, parts, alpha)


def gradient_descent(param: Tensor, group: dict, numerics: Numerics) -> None:
    """``p ← p − lr (∇p + wd · p)`` with the group's lr and weight decay (the gradient unscaled by a loss scaler's
    factor); untouched when ``p.grad`` is None or the step is rejected on the device."""
    if param.grad is None:
        return
    unscale = numerics.grad_unscale
    grad = param.grad if unscale is None else param.grad * unscale
    param.add_(numerics.mask(torch.add(grad, param, alpha=group["weight_decay"])), alpha=-group["lr"])


def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor (0-dim, on its device): one multi-tensor op, or, while torch.compile traces, a
    norm per tensor, which the compiler fuses into the step's kernels (``_foreach_norm`` is an opaque call to
    it; on the CPU, a norm per tensor)."""
    if tracing():
        return [torch.linalg.vector_norm(t) for t in tensors]
    return list(torch._foreach_norm(tensors))


def summed_inner(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``Σ_blocks ⟨x, y⟩`` over aligned lists of equal-shape tensors, as a 0-dim device tensor (no host sync)."""
    return torch.stack([torch.vdot(x.flatten(), y.flatten()) for x, y in zip(xs, ys)]).sum()


def kl_clip_scale(inner: Tensor, lr: float, kl_clip: float) -> Tensor:
    """``min(1, sqrt(kl_clip / (lr² · inner)))`` for ``lr > 0`` (1 where ``inner ≤ 0``; NaN stays NaN), as
    ``rsqrt(inner) · sqrt(kl_clip)/lr``: four device operations, no host sync."""
    return (inner.clamp_min(0.0).rsqrt() * (math.sqrt(kl_clip) / lr)).clamp(max=1.0)


def kl_clip_(directions: list[Tensor], vectors: list[Tensor], lr: float, kl_clip: Optional[float]) -> Optional[Tensor]:
    """Scale ``directions`` (``P(v)`` per block) in place by K-FAC's KL clip factor ``ν`` (:func:`kl_clip_scale` of
    ``Σ⟨d, v⟩``); returns that inner product, or None when there is no clip (``kl_clip`` None, or ``lr = 0``).

    The inner product is the check of the update too (:meth:`Numerics.update_is_finite`'s ``total``): it is
    non-finite whenever an entry of a direction is (an infinite entry times its vector's entry is infinite, or NaN
    where that is 0), and a non-finite ``v`` makes its direction ``P(v)`` non-finite; with it finite, ``ν`` is
    finite. An inner product that overflows with finite directions (past 3e38 in float32) is taken as non-finite:
    that step is skipped, where ``ν`` would have been 0."""
    if kl_clip is None or lr == 0:
        return None
    inner = summed_inner(directions, vectors)
    torch._foreach_mul_(directions, kl_clip_scale(inner, lr, kl_clip))
    return inner


def heavy_ball(buffers: list[Tensor], directions: list[Tensor], momentum: float, numerics: Numerics) -> None:
    """``buf ← μ buf + d`` for every block in multi-tensor operations.

    A plain step rejected on the device keeps the buffers as they were: the directions are masked to 0 (they may
    hold NaN) and the factor μ to 1. The factor is made in each buffer's dtype: an accepted step rounds as the
    unmasked one does, and on CUDA the multi-tensor kernels take their one-launch path only when the factor's
    dtype is the tensors'."""
    if numerics.accepted is None:
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions)
        return
    for d in directions:
        numerics.mask(d)
    for dtype, members in _by_dtype(buffers).items():
        same = [buffers[i] for i in members]
        torch._foreach_mul_(same, numerics.mask(torch.full((), momentum, dtype=dtype, device=numerics.device), 1.0))
        torch._foreach_add_(same, [directions[i] for i in members])


class BufferUpdates:
    """``W̄ ← W̄ + alpha · buf`` from per-block buffers (KFAC's momentum), with the buffers' views shaped as the
    parameters made once per buffer: kept while the buffer is the block's (it is updated in place;
    ``load_state_dict`` or a move of the model replaces it), made afresh where they would not be views of the
    buffer, and while torch.compile traces (there views cost nothing)."""

    def __init__(self) -> None:
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}

    def add(self, blocks, buffers: list[Tensor], alpha: float, numerics: Numerics) -> None:
        """The update, in one multi-tensor operation (none moves on a plain step rejected on the device: the views
        are multiplied by the verdict, a 1 masked to 0, in their dtype)."""
        params, parts = [], []
        for block, buffer in zip(blocks, buffers, strict=True):
            params += block.params
            parts += self._parameter_views(block, buffer)
        if numerics.accepted is not None:
            for dtype, members in _by_dtype(parts).items():
                kept = numerics.mask(torch.ones((), dtype=dtype, device=numerics.device))
                for i, product in zip(members, torch._foreach_mul([parts[i] for i in members], kept)):
                    parts[i] = product
        reference.scaled_add_(params, parts, alpha)

    def _parameter_views(self, block, buffer: Tensor) -> list[Tensor]:
        if tracing():
            return block.unflatten(buffer)
        cached = self._views.get(id(block))
        if cached is None or cached[0] is not buffer:
            parts = block.unflatten(buffer)
            storage = buffer.untyped_storage().data_ptr()
            if not all(part.untyped_storage().data_ptr() == storage for part in parts):
                return parts
            cached = (buffer, parts)
            self._views[id(block)] = cached
        return cached[1]


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[int]]:
    """The indices of ``tensors`` grouped by dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(i)
    return groups
