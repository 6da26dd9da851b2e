"""Q-KLD-WRM, Proposition 4.2 / A.1 with the reweighted-factor approximation (S82)–(S89), or with the two-term
Kronecker sum of eq. (81) inverted exactly — docs/algorithms.md §3. The batched pieces of the step are in
:mod:`kldwrm_fast.optim.q_steps`."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.curvature.state import store, store_all
from kldwrm_fast.ops import tracing
from kldwrm_fast.optim.base import CurvatureOptimizer
from kldwrm_fast.optim.options import FULL_EVERY, MAX_FACTOR_DIM, WARM_TOL, QOptions, group_option
from kldwrm_fast.optim.q_steps import (
    BASIS,
    EIGENBASIS,
    REJECTED,
    GrowthGuard,
    change_basis,
    clip_,
    kl_clip_steps,
    regime,
    steps_and_products,
)
from kldwrm_fast.optim.updates import add_to_parameters, recursion_ratio, tensor_norms


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

    Between inverse steps the recursion is carried in the averages' eigenbasis, where ``M`` is diagonal; the growth
    guard restarts a block whose ``‖Ĝ_k‖ > ghat_growth_limit · ‖V_k‖`` (or that is not finite) from ``Ĝ_k = V_k``,
    counted in :attr:`ghat_resets`; ``curvature_sum="exact"`` inverts ``Ā ⊗ Γ̄ + lr A ⊗ Γ`` itself (eq. (80)). How
    each is computed, and what it costs: :mod:`kldwrm_fast.optim.q_steps`.

    Attributes set on the optimizer (kept in every param group, so ``state_dict`` carries them):
    ``ghat_growth_limit`` (default 100; None disables the guard) and ``exact_damping_iterations`` (default 50).

    Args: as :class:`~kldwrm_fast.KFAC` with ``clip`` (τ > 0 or None, default 2.0) in place of ``momentum``;
    ``kl_clip`` (default None) applies K-FAC's KL clip to the Q step before ``clip``; paper default ``rho=0.5``.
    ``bias``, ``eigenvalue_floor``, ``repeated_calls``, ``weight_sharing``, ``max_factor_dim``, ``predictive_module``,
    ``others``, ``others_kwargs``, ``eigensolver``, ``warm_iters``, ``warm_tol`` and ``full_every`` as for KFAC;
    ``max_step_rms`` (> 0 or None, default 0.02): the step cap above.
    ``curvature_sum``: ``"reweighted"`` (default) or ``"exact"``; a checkpoint resumes only with the value it was
    saved with.
    """

    fixed_options = (*CurvatureOptimizer.fixed_options, "curvature_sum")
    update_check = "q_step"
    ghat_growth_limit = group_option("ghat_growth_limit", "The growth guard's bound on ‖Ĝ‖/‖V‖ (None: off).")
    exact_damping_iterations = group_option(
        "exact_damping_iterations", "curvature_sum='exact': the most conjugate-gradient iterations for δ I."
    )
    _step_cap: Optional[float] = None  # this step's max_step_rms where it binds (set on the host: see _plan_clip)
    _warned_cap = False

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
        weight_sharing: str = "expand",
        max_factor_dim: Optional[int] = MAX_FACTOR_DIM,
        eigensolver: str = "exact",
        warm_iters: int = 1,
        warm_tol: float = WARM_TOL,
        full_every: Optional[int] = FULL_EVERY,
    ) -> None:
        options = QOptions(
            lr=lr, rho=rho, damping=damping, clip=clip, weight_decay=weight_decay, stat_freq=stat_freq,
            inv_freq=inv_freq, fisher=fisher, predictive=predictive, backend=backend, kl_clip=kl_clip, bias=bias,
            eigenvalue_floor=eigenvalue_floor, curvature_sum=curvature_sum, max_step_rms=max_step_rms,
            repeated_calls=repeated_calls, weight_sharing=weight_sharing,
            max_factor_dim=max_factor_dim, eigensolver=eigensolver, warm_iters=warm_iters,
            warm_tol=warm_tol, full_every=full_every,
        )  # fmt: skip
        self._start(model, options, predictive_module, others, others_kwargs)

    def _start(self, model, options: QOptions, predictive_module, others, others_kwargs) -> None:
        """The construction Q and QE share, from their options."""
        self.curvature_sum = options.curvature_sum
        super().__init__(model, options, predictive_module, others, others_kwargs)
        self._growth = GrowthGuard(type(self).__name__, [block.name for block in self.curvature.blocks])

    @property
    def ghat_resets(self) -> int:
        """How many times a block's recursion restarted (reads the device-side counts: a host sync)."""
        self._growth.report(self.ghat_growth_limit)
        return sum(self._growth.reported)

    def _make_counters(self, device: torch.device) -> list[Tensor]:
        counters = super()._make_counters(device) + [self._growth.counter(device)]
        if self.param_groups[0]["ghat_growth_limit"] is not None:  # made here, so the compiled step finds it
            rejected = self.global_state.get(REJECTED)
            self.global_state[REJECTED] = (
                torch.zeros((), dtype=torch.bool, device=device) if rejected is None else rejected.to(device)
            )
        return counters

    def _update(self, group, plan, grads):
        steps = self._q_steps(group, plan, grads)
        self._apply_clipped(group, plan.blocks, steps, plan.lr)

    def _q_steps(self, group, plan, grads) -> list[Tensor]:
        """Advance the recursion to ``Ĝ_k`` and return the unclipped steps ``S_k`` (stores ``M_k``).

        Inverse steps precondition with ``Â_q, Γ̂_q`` and pair ``M`` with the current averages; the steps up to
        the next inverse step follow eq. (20) with the decompositions of ``Ā_j, Γ̄_j`` (see the class docstring),
        where ``M`` is diagonal: there the buffers are carried in that eigenbasis. With ``lr_k = 0`` the step is
        zero, ``M_k`` its limit ``Γ̄ P(Ĝ) Ā``, and the recursion restarts from ``V``."""
        rho, lr, limit = group["rho"], plan.lr, group["ghat_growth_limit"]
        exact = group["curvature_sum"] == "exact"
        states = [self.block_state(block) for block in plan.blocks]
        if plan.inverse_due and self.global_state.get(BASIS) == EIGENBASIS:
            self._change_basis(False, plan.indices)  # before its decomposition is replaced
        # Â_q = ρ Ā_{q−1} + c_q A_q, Γ̂_q likewise (S82)–(S83), c_q = (1 − ρ) + lr_q; exact: the joint bases
        self.estimator.refresh(plan, rho, reweight=None if exact else (1.0 - rho) + lr)
        if exact and plan.inverse_due:
            self.estimator.decompose_joint(plan.blocks, group["damping"])
        in_eigenbasis = self.global_state.get(BASIS) == EIGENBASIS
        vs = plan.batches.rotate(self._ops, states, grads) if in_eigenbasis else grads
        # Ĝ_k = V_k + (λ_k/λ_{k−1}) ρ (Ĝ_{k−1} − V_{k−1} − M_{k−1})   (S103); Ĝ_0 = V_0
        lr_prev, rejected = self.global_state["lr_prev"], self.global_state.get(REJECTED)
        carried = []  # blocks whose recursion continues; the others (re)start it from V
        for i, (state, v) in enumerate(zip(states, vs)):
            if lr_prev is not None and "g_hat" in state:
                carried.append(i)
            else:
                store(state, "g_hat", v.clone())
                store(state, "v_prev", v.clone())
                store(state, "m", torch.zeros_like(v))
        if carried:
            kept = [states[i] for i in carried]
            self._ops.ghat_recursion(
                [vs[i] for i in carried], [s["g_hat"] for s in kept], [s["v_prev"] for s in kept],
                [s["m"] for s in kept], recursion_ratio(rho, lr_prev, lr),
            )  # fmt: skip
            if limit is not None:  # norms are the same in either basis
                indices = tuple(plan.indices[i] for i in carried)
                self._growth.guard(limit, kept, [vs[i] for i in carried], indices, self.numerics, rejected)
                if plan.inverse_due:  # waits for the eigensolver anyway
                    self._growth.report(limit)
        if rejected is not None and not self.numerics.on_device:  # consumed; a device verdict overwrites it instead
            rejected.fill_(False)
        # S_k = −lr_k P_{Â,Γ̂}(Ĝ_k)  (S89),  M_k = −λ_k Γ̄ S_k Ā  (S87); lr = 0: made with lr 1, S not applied
        g_hats = [s["g_hat"] for s in states]
        form = regime(exact, plan.inverse_due, in_eigenbasis, self.estimator.steps_without_inverse())
        steps, products = steps_and_products(
            form, plan.blocks, plan.batches, self._ops, states, g_hats, group["damping"], lr, lr if lr > 0 else 1.0,
            in_eigenbasis, group["exact_damping_iterations"],
        )  # fmt: skip
        store_all(states, "m", products)
        if group["kl_clip"] is not None and lr > 0:
            kl_clip_steps(group["kl_clip"], plan.batches, self._ops, states, steps, g_hats, lr, in_eigenbasis)
        if plan.inverse_due and self.estimator.steps_without_inverse():
            self._change_basis(True, plan.indices)
        return steps

    def _change_basis(self, into_eigenbasis: bool, taking_part: tuple[int, ...]) -> None:
        """The recursion of the blocks ``taking_part`` that carry one, into or out of the eigenbasis of the current
        ``Ā_j, Γ̄_j`` (:func:`~kldwrm_fast.optim.q_steps.change_basis`). A block not taking part keeps its
        decomposition, so its recursion stays in that decomposition's eigenbasis, untouched."""
        blocks = self.curvature.blocks
        indices = tuple(i for i in taking_part if "g_hat" in self.block_state(blocks[i]))
        states = [self.block_state(blocks[i]) for i in indices]
        change_basis(self.estimator.batches_for(indices), self._ops, states, inverse=not into_eigenbasis)
        self.global_state[BASIS] = EIGENBASIS if into_eigenbasis else "parameter"

    def _apply_clipped(self, group, blocks, steps, lr) -> None:
        """``W̄ ← W̄ + clip(S)``, with all blocks' scales ``min(1, τ/r)`` computed at once on the device; nothing
        moves when ``lr = 0`` or when a step is not finite. A plain step rejected on the device also restarts the
        recursion (Note [numerics on the device])."""
        tau = group["clip"]
        if not tracing():
            self._plan_clip(group, lr)
        norms = tensor_norms(steps) if lr != 0 and tau is not None else None
        # The clip's norms are the check of the steps too: a norm is non-finite whenever an entry is.
        total = None if norms is None else torch.stack(norms).sum()
        applied = lr != 0 and self.numerics.update_is_finite(steps, group, self.global_state["step"], total)
        if self.numerics.accepted is not None:
            if group["ghat_growth_limit"] is not None:
                # The guard's pass at the next step restarts every block (without counting it as its own), so
                # no pass over the state is needed here.
                store(self.global_state, REJECTED, self.numerics.rejected())
            else:
                for block in blocks:
                    state = self.block_state(block)
                    for key in ("g_hat", "v_prev", "m"):
                        self.numerics.mask(state[key])
        if not applied:
            return
        if tau is not None:
            clip_(steps, norms, self._step_cap if self._step_cap is not None else tau * lr)
        add_to_parameters(blocks, steps, 1.0, self.numerics)

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
