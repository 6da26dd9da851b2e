"""Q-KLD-WRM, Proposition 4.2 / A.1 with the reweighted-factor approximation (S82)–(S89), or with the two-term
Kronecker sum of eq. (81) inverted exactly — docs/algorithms.md §3."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.joint import exact_step
from kldwrm_fast.curvature.state import (
    AVERAGE_KEYS,
    EIGEN_KEYS,
    EIGENVECTOR_KEYS,
    HAT_EIGEN_KEYS,
    JOINT_EIGEN_KEYS,
    store,
    store_all,
)
from kldwrm_fast.ops import Operations, reference
from kldwrm_fast.optim.arguments import validate_curvature_sum, validate_positive_or_none
from kldwrm_fast.optim.base import CurvatureOptimizer, kl_clip_scale, summed_inner, tensor_norms

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
    if ops.takes_unbatched and not torch.compiler.is_compiling():
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


class QKLDWRM(CurvatureOptimizer):
    """Quadratic KLD-WRM.

    Per block, with ``λ_k = 1/lr_k`` and ``c_k = (1−ρ) + lr_k``::

        inverse step q:  Â_q = ρ Ā_{q−1} + c_q A_q,   Γ̂_q = ρ Γ̄_{q−1} + c_q Γ_q,   M uses Γ̄_q, Ā_q
        other steps k:   Â_k = (1 + lr_k) Ā_j,   Γ̂_k = (1 + lr_k) Γ̄_j,   M uses Γ̄_j, Ā_j
                         (j the last inverse step: eq. (20) when stat_freq == inv_freq)
        Ĝ_0 = V_0,   Ĝ_k = V_k + (λ_k/λ_{k−1}) ρ (Ĝ_{k−1} − V_{k−1} − M_{k−1})
        S_k = −lr_k P_{Â,Γ̂}(Ĝ_k),   M_k = −λ_k Γ̄ S_k Ā
        W̄ ← W̄ + clip(S_k),  clip: scale by τ/r when r = ‖S_k‖/(lr_k √numel) > τ

    Step cap (``max_step_rms``, default 0.02, the paper's ``τ · lr`` at its own lr 0.01 and τ = 2): the clip's
    bound on the step, ``RMS(S_k) ≤ τ lr_k``, grows with lr; above ``lr = max_step_rms / τ`` the clip uses
    ``τ = max_step_rms / lr_k`` instead, so no block's step has an RMS above ``max_step_rms`` (a warning says so
    once). Without it Q diverged at 3× its default lr on the paper CNN (docs/algorithms.md §3, "Step cap");
    at and below ``lr = max_step_rms / τ`` it changes nothing. ``max_step_rms=None`` turns it off.

    The recursion always uses the unclipped ``S_k``. State per block adds ``"g_hat"``, ``"v_prev"``, ``"m"``.

    Cost: an inverse step followed by steps without one decomposes both ``Â_q, Γ̂_q`` (for itself) and
    ``Ā_q, Γ̄_q`` (for the others) in one grouped call. On the other steps ``M`` is diagonal in the eigenbasis
    of ``Ā_j, Γ̄_j``, so the recursion is carried in that basis (``global_state["ghat_basis"] == "eigen"``:
    ``"g_hat"``, ``"v_prev"``, ``"m"`` hold ``Q_Γᵀ(·)Q_A``) and such a step costs KFAC's four GEMMs per block
    (rotating ``V`` in, ``S`` out); moving the recursion into and out of the basis costs two GEMMs per block
    at each inverse step. These products run as ``torch.matmul`` on every backend.

    Growth guard: the paper (Sec. 4.3) bounds ``Ĝ`` when ``ρ‖I − M̂_k‖ ≤ δ < 1``. As a cheap proxy, a block
    whose ``‖Ĝ_k‖ > ghat_growth_limit · ‖V_k‖`` (or is not finite) restarts its recursion from
    ``Ĝ_k = V_k``, counted in :attr:`ghat_resets` (``ghat_growth_limit = None`` disables it). The check and
    the restart run on the device without a host synchronisation; resets are counted there and reported
    (a warning naming the blocks) on inverse steps, which wait for the eigensolver anyway, and whenever
    :attr:`ghat_resets` is read.

    ``curvature_sum="exact"`` (the paper's "approach 1") inverts ``Ā ⊗ Γ̄ + lr A ⊗ Γ`` itself instead of
    ``Â ⊗ Γ̂``: on an inverse step each local factor is diagonalised together with its average
    (:mod:`kldwrm_fast.curvature.joint`: the averages' eigendecompositions, then one eigendecomposition per
    factor of the local factor whitened by its average, batched with the same ladder); the damping ``δ I``, which
    no joint basis diagonalises, is solved for by conjugate gradients there, to rounding level (at most
    :attr:`exact_damping_iterations`, three GEMMs per block each, on inverse steps only). ``Â, Γ̂`` are not formed. On
    the other steps eq. (20) makes the sum ``(1 + lr_k) Ā_j ⊗ Γ̄_j``, preconditioned in the averages' eigenbasis
    as above, at the reweighted mode's cost. An inverse step decomposes the averages and the whitened local
    factors (twice the reweighted mode's eigendecompositions when ``inv_freq == 1``, as many otherwise) and adds
    two GEMMs per block, and three per iteration, to the reweighted mode's six.

    Args: as :class:`~kldwrm_fast.KFAC` with ``clip`` (τ > 0 or None, default 2.0) in place of ``momentum``;
    ``kl_clip`` (default None) applies K-FAC's KL clip to the Q step before ``clip``; paper default ``rho=0.5``.
    ``bias``, ``eigenvalue_floor``, ``repeated_calls``, ``predictive_module``, ``others`` and ``others_kwargs`` as
    for KFAC; ``max_step_rms`` (> 0 or None, default 0.02): the step cap above. ``curvature_sum``:
    ``"reweighted"`` (default) or ``"exact"``; a checkpoint resumes only with the value it was saved with.
    """

    fixed_options = (*CurvatureOptimizer.fixed_options, "curvature_sum")

    exact_damping_iterations: int = 50
    """``curvature_sum="exact"`` with damping: the most conjugate-gradient iterations for ``δ I`` on an inverse step
    (they stop at rounding level, :func:`kldwrm_fast.curvature.joint.tolerance`; docs/algorithms.md §3 gives the
    counts measured)."""
    ghat_growth_limit: Optional[float] = 100.0
    _step_cap: Optional[float] = None  # this step's max_step_rms where it binds (set on the host: see _plan_clip)
    _warned_cap = False
    _ghat_reset_counts: Optional[torch.Tensor] = None  # per block, on the device
    _ghat_reported_counts: tuple = ()  # the counts last reported, on the host

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        lr: float = 0.01,
        rho: float = 0.5,
        damping: float = 0.01,
        clip: Optional[float] = 2.0,
        weight_decay: float = 0.0,
        stat_freq: int = 30,
        inv_freq: int = 30,
        fisher: str = "sampled",
        predictive: str = "categorical",
        backend: str = "auto",
        kl_clip: Optional[float] = None,
        bias: str = "folded",
        eigenvalue_floor: float = 0.0,
        curvature_sum: str = "reweighted",
        max_step_rms: Optional[float] = 0.02,
        repeated_calls: str = "expand",
        predictive_module: Optional[nn.Module] = None,
        others: Optional[Callable] = None,
        others_kwargs: Optional[dict] = None,
    ) -> None:
        validate_positive_or_none("clip", clip)
        validate_positive_or_none("kl_clip", kl_clip)
        validate_curvature_sum(curvature_sum)
        validate_positive_or_none("max_step_rms", max_step_rms)
        self.curvature_sum = curvature_sum
        defaults = dict(
            lr=lr, rho=rho, damping=damping, clip=clip, weight_decay=weight_decay,
            stat_freq=stat_freq, inv_freq=inv_freq, kl_clip=kl_clip, eigenvalue_floor=eigenvalue_floor,
            curvature_sum=curvature_sum, max_step_rms=max_step_rms, **self._more_defaults(),
        )  # fmt: skip
        super().__init__(
            model, defaults, fisher, predictive, backend, bias,
            repeated_calls=repeated_calls, predictive_module=predictive_module, others=others,
            others_kwargs=others_kwargs,
        )  # fmt: skip

    def _more_defaults(self) -> dict:
        """Hyperparameters a subclass adds to the param groups (QE's inner solver), set before ``__init__``."""
        return {}

    @property
    def ghat_resets(self) -> int:
        """How many times a block's recursion restarted (reads the device-side counts: a host sync)."""
        self._report_resets()
        return sum(self._ghat_reported_counts)

    def _make_counters(self, device: torch.device) -> list[Tensor]:
        self._counter("_ghat_reset_counts", (len(self.curvature.blocks),), device)
        if self.ghat_growth_limit is not None:  # made here, so that the compiled step finds it and keeps it
            rejected = self.global_state.get(REJECTED)
            self.global_state[REJECTED] = (
                torch.zeros((), dtype=torch.bool, device=device) if rejected is None else rejected.to(device)
            )
        return super()._make_counters(device) + [self._ghat_reset_counts]

    def _update_check_sees_gradients(self, group: dict, lr: float) -> bool:
        """Q's check of its steps (the step clip's norms, or a pass over the steps) sees every gradient: ``V``
        enters ``Ĝ`` entry by entry (the recursion adds to it; the growth guard replaces a non-finite ``Ĝ`` by
        ``V``), and a non-finite entry of ``Ĝ`` makes every entry of ``P(Ĝ)`` non-finite (see the base class).
        Not with ``curvature_sum="exact"``, whose steps come from another solve (nor for QE, which says so)."""
        return group["curvature_sum"] != "exact" and lr != 0

    def _guard_recursion(self, states: list[dict], grads, indices: tuple[int, ...]) -> None:
        """Restart, on the device, the recursion of blocks whose ``Ĝ`` outgrew ``V`` (see the class docstring);
        ``indices``: the blocks' positions in ``curvature.blocks``, where the counts are kept."""
        g_hats = [s["g_hat"] for s in states]
        g_norms = torch.stack(tensor_norms(g_hats))
        v_norms = torch.stack(tensor_norms(grads))
        violated = ~(g_norms <= self.ghat_growth_limit * v_norms)  # also true where Ĝ is not finite
        if self._now.accepted is not None:  # a rejected step's NaN is not counted as growth
            counted = violated & self._now.accepted
        elif self._now.verdict_on_device:  # the gradients' check comes later (_update_check_sees_gradients)
            counted = violated & (v_norms < math.inf)  # a norm is finite exactly when below inf (NaN is not)
        else:
            counted = violated
        rejected = self.global_state.get(REJECTED)
        if rejected is not None:  # the last plain step was rejected: every block restarts, not counted
            counted = counted & ~rejected
            violated = violated | rejected
        for restart, g_hat, v in zip(violated.unbind(), g_hats, grads):
            torch.where(restart, v, g_hat, out=g_hat)
        n_blocks = len(self.curvature.blocks)
        if len(indices) < n_blocks:
            per_block = violated.new_zeros(n_blocks, dtype=torch.int64)
            per_block[list(indices)] = counted.to(torch.int64)
            counted = per_block
        self._counter("_ghat_reset_counts", (n_blocks,), counted.device).add_(counted)

    def _report_resets(self) -> None:
        """Warn about restarts counted since the last report (one host transfer)."""
        if self._ghat_reset_counts is None:
            return
        counts = tuple(self._ghat_reset_counts.tolist())
        new = [c - r for c, r in zip(counts, self._ghat_reported_counts or (0,) * len(counts))]
        self._ghat_reported_counts = counts
        if not any(new):
            return
        names = [f"{block.name} ({n}×)" for block, n in zip(self.curvature.blocks, new) if n]
        warnings.warn(
            f"{type(self).__name__}: Ĝ grew past {self.ghat_growth_limit}·‖V‖ (or was not finite) in "
            f"{', '.join(names)}; the recursion restarted from V",
            RuntimeWarning,
            stacklevel=4,
        )

    def _q_steps(self, group, blocks, grads, info):
        """Advance the recursion to ``Ĝ_k`` and return the unclipped steps ``S_k`` (stores ``M_k``).

        Inverse steps precondition with ``Â_q, Γ̂_q`` and pair ``M`` with the current averages; the steps up to
        the next inverse step follow eq. (20) with the decompositions of ``Ā_j, Γ̄_j`` (see the class docstring),
        where ``M`` is diagonal: there the buffers are carried in that eigenbasis.

        With ``lr_k = 0`` the step is zero, ``M_k`` its limit ``Γ̄ P(Ĝ) Ā``, and ``λ_k/λ_{k−1}`` (either side
        zero) is taken as 0: the recursion restarts from ``V``.
        """
        rho, lr = group["rho"], info.lr
        exact = group["curvature_sum"] == "exact"
        states = [self.block_state(block) for block in blocks]
        if info.inverse_due and self.global_state.get(BASIS) == EIGENBASIS:
            self._change_basis(PARAMETER_BASIS, info.indices)  # before its decomposition is replaced
        self.estimator.refresh(blocks, info, rho, reweight=None if exact else (1.0 - rho) + lr)
        if exact and info.inverse_due:
            self.estimator.decompose_joint(blocks, group["damping"])
        in_eigenbasis = self.global_state.get(BASIS) == EIGENBASIS
        vs = info.batches.rotate(self._ops, states, grads) if in_eigenbasis else grads
        lr_prev = self.global_state["lr_prev"]
        coef = rho * lr_prev / lr if lr_prev and lr else 0.0
        carried = []  # blocks whose recursion continues; the others (re)start it from V
        for i, (state, v) in enumerate(zip(states, vs)):
            if lr_prev is not None and "g_hat" in state:
                carried.append(i)
            else:
                store(state, "g_hat", v.clone())
                store(state, "v_prev", v.clone())
                store(state, "m", torch.zeros_like(v))
        if carried:
            self._ops.ghat_recursion(
                [vs[i] for i in carried], [states[i]["g_hat"] for i in carried],
                [states[i]["v_prev"] for i in carried], [states[i]["m"] for i in carried], coef,
            )  # fmt: skip
            if self.ghat_growth_limit is not None:
                self._guard_recursion(
                    [states[i] for i in carried], [vs[i] for i in carried], tuple(info.indices[i] for i in carried)
                )  # norms are the same in either basis
                if info.inverse_due:  # waits for the eigensolver anyway
                    self._report_resets()
        rejected = self.global_state.get(REJECTED)
        if rejected is not None and not self._now.verdict_on_device:  # consumed; a device verdict overwrites it instead
            rejected.fill_(False)
        g_hats = [s["g_hat"] for s in states]
        damping = group["damping"]
        step_lr = lr if lr > 0 else 1.0  # lr = 0: S/(−lr) and M are computed with lr 1; S is not applied
        if exact and not in_eigenbasis and info.inverse_due:
            iterations = self.exact_damping_iterations
            steps, products = q_exact_steps(info.batches, self._ops, states, g_hats, damping, step_lr, iterations)
            for state in states:
                for key in JOINT_EIGEN_KEYS:
                    del state[key]
        elif exact:  # eq. (20): the sum is (1 + lr) Ā_j ⊗ Γ̄_j, preconditioned in the eigenbasis of Ā_j, Γ̄_j
            scales = [(1.0, 1.0 + lr)] * len(blocks)
            rotated = g_hats if in_eigenbasis else info.batches.rotate(self._ops, states, g_hats)
            steps, products = q_cached_steps(info.batches, self._ops, states, rotated, damping, step_lr, scales)
            if not in_eigenbasis:  # inv_freq == 1 and this step's inverse skipped (nothing captured): M back out
                products = info.batches.rotate(self._ops, states, products, inverse=True)
        elif in_eigenbasis:
            scales = [block.cached_reweight(lr) for block in blocks]
            steps, products = q_cached_steps(info.batches, self._ops, states, g_hats, damping, step_lr, scales)
        elif not self.estimator.steps_without_inverse():
            steps, products = q_steps(info.batches, self._ops, states, g_hats, damping, step_lr)
        else:
            steps, products = q_steps(info.batches, self._ops, states, g_hats, damping, step_lr, HAT_EIGEN_KEYS)
            for state in states:
                for key in HAT_EIGEN_KEYS:
                    del state[key]
        store_all(states, "m", products)
        if group["kl_clip"] is not None and lr > 0:
            self._kl_clip(group["kl_clip"], info.batches, states, steps, g_hats, lr, in_eigenbasis)
        if info.inverse_due and self.estimator.steps_without_inverse():
            self._change_basis(EIGENBASIS, info.indices)
        return steps

    def _kl_clip(self, kl_clip, batches, states, steps, g_hats, lr, in_eigenbasis) -> None:
        """K-FAC's KL clip on the Q steps, in place, before ``clip``: ``ν = min(1, sqrt(kl_clip / (lr² Σ⟨P(Ĝ), Ĝ⟩)))``
        with ``P(Ĝ) = −S/lr`` (the author's code clips Q this way); the recursion keeps the unscaled ``S`` in ``M``.
        Between inverse steps ``Ĝ`` is held in the eigenbasis, so ``S`` is rotated there for the inner product
        (two more GEMMs per block, only with ``kl_clip``)."""
        same_basis = batches.rotate(self._ops, states, steps) if in_eigenbasis else steps
        total = summed_inner(same_basis, g_hats)
        torch._foreach_mul_(steps, kl_clip_scale(total * (-1.0 / lr), lr, kl_clip))

    def _change_basis(self, basis: str, taking_part: tuple[int, ...]) -> None:
        """Move the recursion into the eigenbasis of the current ``Ā_j, Γ̄_j`` (``EIGENBASIS``, after an inverse
        step followed by steps without one) or back out of it (``PARAMETER_BASIS``, before the next inverse
        step replaces the decomposition), for the blocks ``taking_part`` in the step that carry one. Only
        ``Ĝ − V_prev − M`` reaches the next step, so it alone is rotated (two GEMMs per block), into ``"g_hat"``;
        ``"v_prev"`` and ``"m"`` are zeroed. A block not taking part keeps its decomposition, so its recursion
        stays in that decomposition's eigenbasis, untouched."""
        blocks = self.curvature.blocks
        indices = tuple(i for i in taking_part if "g_hat" in self.block_state(blocks[i]))
        states = [self.block_state(blocks[i]) for i in indices]
        carry = torch._foreach_sub([s["g_hat"] for s in states], [s["v_prev"] for s in states])
        torch._foreach_sub_(carry, [s["m"] for s in states])
        inverse = basis == PARAMETER_BASIS
        moved = self._batches_for(indices).rotate(self._ops, states, carry, inverse=inverse)
        for state, value in zip(states, moved):
            store(state, "g_hat", value.contiguous())
            state["v_prev"].zero_()
            state["m"].zero_()
        self.global_state[BASIS] = basis

    def _apply_clipped(self, group, blocks, steps, lr) -> None:
        """``W̄ ← W̄ + clip(S)``, with all blocks' scales ``min(1, τ/r)`` computed at once on the device; nothing
        moves when ``lr = 0`` or when a step is not finite (see ``_update_is_finite``). A plain step rejected on
        the device also zeroes the recursion, which restarts (Note [numerics on the device])."""
        tau = group["clip"]
        if not torch.compiler.is_compiling():
            self._plan_clip(group, lr)
        norms = tensor_norms(steps) if lr != 0 and tau is not None else None
        # The clip's norms are the check of the steps too: a norm is non-finite whenever an entry is.
        applied = lr != 0 and self._update_is_finite(steps, group, None if norms is None else torch.stack(norms).sum())
        if self._now.accepted is not None:
            if self.ghat_growth_limit is not None:
                # The guard's pass at the next step restarts every block (without counting it as its own), so
                # no pass over the state is needed here.
                store(self.global_state, REJECTED, self._rejected_on_device())
            else:
                for block in blocks:
                    state = self.block_state(block)
                    for key in ("g_hat", "v_prev", "m"):
                        self._masked(state[key])
        if not applied:
            return
        if tau is None:
            self._add_to_parameters(blocks, steps)
            return
        # r/τ = ‖S‖ / (τ lr √numel); the scale is min(1, τ/r).
        ratios = torch._foreach_div(norms, [math.sqrt(s.numel()) for s in steps])
        if self._step_cap is not None:  # τ lr past max_step_rms: the scale is min(1, max_step_rms / RMS(S))
            scales = torch.stack(ratios).mul_(1.0 / self._step_cap).reciprocal_().clamp_(max=1.0)
        else:
            # (1/(τ lr) on the stacked tensor, not in the list: a float there would be specialised; see scale_)
            scales = torch.stack(ratios).mul_(1.0 / (tau * lr)).reciprocal_().clamp_(max=1.0)
        torch._foreach_mul_(steps, scales.unbind())
        self._add_to_parameters(blocks, steps)

    def _plan_clip(self, group: dict, lr: float) -> None:
        """Decide on the host whether the step cap binds at this lr (``τ lr > max_step_rms``), warning once when it
        first does; a traced plain step reads the decision (:meth:`_before_traced_step` makes it eagerly)."""
        tau, cap = group["clip"], group["max_step_rms"]
        binds = cap is not None and tau is not None and lr > 0 and tau * lr > cap
        self._step_cap = cap if binds else None
        if binds and not self._warned_cap:
            self._warned_cap = True
            warnings.warn(
                f"{type(self).__name__}: lr={lr} with clip={tau} would allow steps of RMS {tau * lr:.3g} per "
                f"weight, past where Q diverged on the paper CNN; steps are capped at RMS max_step_rms={cap} "
                f"(clip {cap / lr:.3g} at this lr); pass max_step_rms=None for the plain clip",
                UserWarning,
                stacklevel=4,
            )

    def _before_traced_step(self) -> None:
        super()._before_traced_step()
        self._plan_clip(self.param_groups[0], self.param_groups[0]["lr"])

    def _update(self, group, blocks, grads, info):
        lr = info.lr
        steps = self._q_steps(group, blocks, grads, info)
        self._apply_clipped(group, blocks, steps, lr)
