"""The pieces of Q-KLD-WRM's step (:mod:`kldwrm_fast.optim.q`), each a batched computation over the blocks: the
step and ``M`` in each regime of the cadence, the recursion's growth guard, and the move of the recursion into and
out of the averages' eigenbasis (docs/algorithms.md §3 "QKLDWRM")."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.joint import exact_step
from kldwrm_fast.curvature.state import (
    AVERAGE_KEYS,
    EIGEN_KEYS,
    EIGENVECTOR_KEYS,
    HAT_EIGEN_KEYS,
    JOINT_EIGEN_KEYS,
    store,
)
from kldwrm_fast.ops import Operations, reference
from kldwrm_fast.optim.numerics import Numerics, device_counter
from kldwrm_fast.optim.updates import tensor_norms

BASIS = "ghat_basis"
REJECTED = "rejected"
"""``global_state`` key: whether the last plain step was rejected on the device (0-dim bool, written in place; absent
before the first verdict), so every block's recursion restarts at the next step (the growth guard's pass does it,
and a step without a device verdict resets it; saved with the state, so a resume restarts too)."""
EIGENBASIS, PARAMETER_BASIS = "eigen", "parameter"


def q_steps(
    batches: BlockBatches, ops: Operations, states: list[dict], g_hats: list[Tensor], damping: float, lr: float,
    eigen_keys: tuple = EIGEN_KEYS,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``(S, M)`` per block, a batched call per group: ``S = −lr P_{Â,Γ̂}(Ĝ)``, ``M = −λ Γ̄ S Ā``; the decompositions
    of ``Â, Γ̂`` under ``eigen_keys``."""

    def compute(_, q_g, d_g, q_a, d_a, ea_g, ea_a, batch):
        return ops.q_precondition(q_g, d_g, q_a, d_a, batch, damping, lr, ea_g, ea_a)

    steps, products = batches.per_group(ops, states, eigen_keys + AVERAGE_KEYS, g_hats, compute)
    return steps, products


def q_cached_steps(
    batches: BlockBatches, ops: Operations, states: list[dict], rotated: list[Tensor], damping: float, lr: float,
    scales: list[tuple[float, float]],
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``(S, M̃)`` per block on a step without new statistics (:func:`kldwrm_fast.ops.reference.q_cached_step`,
    ``rotated`` = ``Q_Γᵀ Ĝ Q_A``; ``scales`` per block, equal within a group).

    On the PyTorch backend (outside torch.compile) block by block, with ``d_Γ d_Aᵀ`` and the denominator kept from
    step to step (:meth:`BlockBatches.eigenvalue_terms`), as for K-FAC's preconditioning; bit for bit the same."""
    if ops.reference_now:
        q_g, q_a = EIGENVECTOR_KEYS
        results = [
            reference.q_divided_step(
                state[q_g], state[q_a], *batches.eigenvalue_terms(i, state, scale_g * scale_a, damping), r, lr
            )
            for i, (state, r, (scale_g, scale_a)) in enumerate(zip(states, rotated, scales, strict=True))
        ]
        return [step for step, _ in results], [product for _, product in results]

    def compute(group, *args):
        return reference.q_cached_step(*args, damping, lr, *scales[group[0]])

    steps, products = batches.per_group(ops, states, EIGEN_KEYS, rotated, compute)
    return steps, products


def q_exact_steps(
    batches: BlockBatches, ops: Operations, states: list[dict], g_hats: list[Tensor], damping: float, lr: float,
    iterations: int,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``(S, M)`` per block with ``curvature_sum="exact"`` (:func:`kldwrm_fast.curvature.joint.exact_step`), a
    batched call per group: the averages' decompositions and the whitened local factors' ones."""

    def compute(_, q_g, d_g, q_a, d_a, u_g, s_g, u_a, s_a, ea_g, ea_a, batch):
        return exact_step(q_g, d_g, u_g, s_g, q_a, d_a, u_a, s_a, ea_g, ea_a, batch, damping, lr, iterations)

    steps, products = batches.per_group(ops, states, EIGEN_KEYS + JOINT_EIGEN_KEYS + AVERAGE_KEYS, g_hats, compute)
    return steps, products


def regime(exact: bool, inverse_due: bool, in_eigenbasis: bool, steps_without_inverse: bool) -> str:
    """Which form of ``(S, M)`` a step takes (docs/algorithms.md §3):

    * ``"reweighted"``: an inverse step with ``inv_freq == 1``, ``P_{Â,Γ̂}`` with the decompositions of ``Â, Γ̂``;
    * ``"reweighted_hat"``: an inverse step followed by steps without one: the same, with ``Â, Γ̂``'s decompositions
      kept beside the averages' for this step only;
    * ``"cached"``: a step between inverse steps, in the eigenbasis of ``Ā_j, Γ̄_j`` (eq. (20));
    * ``"exact"``: ``curvature_sum="exact"`` on an inverse step, eq. (80) solved in the joint bases;
    * ``"exact_cached"``: ``curvature_sum="exact"`` elsewhere, where eq. (20) makes the sum ``(1 + lr) Ā_j ⊗ Γ̄_j``.
    """
    if exact:
        return "exact" if inverse_due and not in_eigenbasis else "exact_cached"
    if in_eigenbasis:
        return "cached"
    return "reweighted_hat" if steps_without_inverse else "reweighted"


def steps_and_products(
    form: str, blocks, batches: BlockBatches, ops: Operations, states: list[dict], g_hats: list[Tensor],
    damping: float, lr: float, step_lr: float, in_eigenbasis: bool, iterations: int,
) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
    """``(S, M)`` per block in the :func:`regime` ``form`` (``step_lr``: the lr the products are made with)."""
    if form == "exact":
        steps, products = q_exact_steps(batches, ops, states, g_hats, damping, step_lr, iterations)
        _drop(states, JOINT_EIGEN_KEYS)
    elif form == "exact_cached":
        rotated = g_hats if in_eigenbasis else batches.rotate(ops, states, g_hats)
        scales = [(1.0, 1.0 + lr)] * len(states)
        steps, products = q_cached_steps(batches, ops, states, rotated, damping, step_lr, scales)
        if not in_eigenbasis:  # inv_freq == 1 and this step's inverse skipped (nothing captured): M back out
            products = batches.rotate(ops, states, products, inverse=True)
    elif form == "cached":
        scales = [block.cached_reweight(lr) for block in blocks]
        steps, products = q_cached_steps(batches, ops, states, g_hats, damping, step_lr, scales)
    elif form == "reweighted":
        steps, products = q_steps(batches, ops, states, g_hats, damping, step_lr)
    else:
        steps, products = q_steps(batches, ops, states, g_hats, damping, step_lr, HAT_EIGEN_KEYS)
        _drop(states, HAT_EIGEN_KEYS)
    return steps, products


def _drop(states: list[dict], keys: tuple) -> None:
    for state in states:
        for key in keys:
            del state[key]


def change_basis(batches: BlockBatches, ops: Operations, states: list[dict], inverse: bool) -> None:
    """Move the recursion of ``states`` into the eigenbasis of the current ``Ā_j, Γ̄_j`` (after an inverse step
    followed by steps without one) or back out of it (``inverse``, before the next inverse step replaces the
    decomposition). Only ``Ĝ − V_prev − M`` reaches the next step, so it alone is rotated (two GEMMs per block),
    into ``"g_hat"``; ``"v_prev"`` and ``"m"`` are zeroed."""
    carry = torch._foreach_sub([s["g_hat"] for s in states], [s["v_prev"] for s in states])
    torch._foreach_sub_(carry, [s["m"] for s in states])
    moved = batches.rotate(ops, states, carry, inverse=inverse)
    for state, value in zip(states, moved):
        store(state, "g_hat", value.contiguous())
        state["v_prev"].zero_()
        state["m"].zero_()


class GrowthGuard:
    """Q's growth guard (see :class:`~kldwrm_fast.QKLDWRM`): restarts, on the device, the recursion of blocks whose
    ``Ĝ`` outgrew ``V``, and counts the restarts there per block (reported on the host by :meth:`report`)."""

    def __init__(self, owner: str, names: list[str]) -> None:
        self.owner, self.names = owner, names
        self.counts: Optional[Tensor] = None  # per block, on the device
        self.reported: tuple = ()  # the counts last reported, on the host

    def counter(self, device: torch.device) -> Tensor:
        self.counts = device_counter(self.counts, (len(self.names),), device)
        return self.counts

    def guard(
        self, limit: float, states: list[dict], grads: list[Tensor], indices: tuple[int, ...], numerics: Numerics,
        rejected: Optional[Tensor],
    ) -> None:  # fmt: skip
        """Restart blocks with ``‖Ĝ‖ > limit · ‖V‖`` (or a non-finite ``Ĝ``) from ``Ĝ = V``, and every block when
        ``rejected`` (the last plain step was rejected on the device; not counted); ``indices``: the blocks'
        positions in ``curvature.blocks``, where the counts are kept."""
        g_hats = [s["g_hat"] for s in states]
        g_norms = torch.stack(tensor_norms(g_hats))
        v_norms = torch.stack(tensor_norms(grads))
        violated = ~(g_norms <= limit * v_norms)  # also true where Ĝ is not finite
        if numerics.accepted is not None:  # a rejected step's NaN is not counted as growth
            counted = violated & numerics.accepted
        elif numerics.on_device:  # the gradients' check comes later (the update's check sees them)
            counted = violated & (v_norms < math.inf)  # a norm is finite exactly when below inf (NaN is not)
        else:
            counted = violated
        if rejected is not None:
            counted = counted & ~rejected
            violated = violated | rejected
        for restart, g_hat, v in zip(violated.unbind(), g_hats, grads):
            torch.where(restart, v, g_hat, out=g_hat)
        n_blocks = len(self.names)
        if len(indices) < n_blocks:
            per_block = violated.new_zeros(n_blocks, dtype=torch.int64)
            per_block[list(indices)] = counted.to(torch.int64)
            counted = per_block
        self.counter(counted.device).add_(counted)

    def report(self, limit: Optional[float]) -> None:
        """Warn about restarts counted since the last report (one host transfer)."""
        if self.counts is None:
            return
        counts = tuple(self.counts.tolist())
        new = [c - r for c, r in zip(counts, self.reported or (0,) * len(counts))]
        self.reported = counts
        if not any(new):
            return
        names = [f"{name} ({n}×)" for name, n in zip(self.names, new) if n]
        warnings.warn(
            f"{self.owner}: Ĝ grew past {limit}·‖V‖ (or was not finite) in {', '.join(names)}; the recursion "
            "restarted from V",
            RuntimeWarning,
            stacklevel=5,
        )
