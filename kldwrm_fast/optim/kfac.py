"""EA-KFAC, the paper's baseline, with the semantics of its reference code (docs/algorithms.md §3 "KFAC")."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.optim.base import CurvatureOptimizer
from kldwrm_fast.optim.options import FULL_EVERY, MAX_FACTOR_DIM, WARM_TOL, KFACOptions
from kldwrm_fast.optim.updates import BufferUpdates, add_to_parameters, heavy_ball, kl_clip_, preconditioned


class KFAC(CurvatureOptimizer):
    """K-FAC with exponentially averaged Kronecker factors, KL clipping and heavy-ball momentum.

    Per block: ``d = P_{Ā,Γ̄}(V)`` with ``P_{A,Γ}(V) = Q_Γ [(Q_Γᵀ V Q_A) / (d_Γ d_Aᵀ + δ)] Q_Aᵀ`` (the inverse of
    ``Ā ⊗ Γ̄ + δ I`` applied through the factors' eigendecompositions); ``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨d, V⟩)))``;
    ``d ← ν d``; ``buf ← μ buf + d``; ``W̄ ← W̄ − lr (1−μ) buf``. ``Ā, Γ̄`` are the exponential averages of
    docs/algorithms.md §2 (eq. (20) between statistics steps).

    Args:
        model: the network (hooks are registered on its Linear/Conv2d layers) or a prebuilt ``Curvature``.
        lr: learning rate ``1/λ``, read from the param group at every step (schedulers work).
        rho: decay ρ ∈ [0, 1) of the factor averages.
        damping: δ ≥ 0 added to the eigenvalue products.
        momentum: μ ∈ [0, 1).
        kl_clip: KL clipping threshold > 0, or None.
        weight_decay: added to the gradient, bias included.
        stat_freq, inv_freq: statistics / eigendecomposition cadence (Note [step cadence] in
            :mod:`kldwrm_fast.curvature.estimator`).
        fisher: ``"sampled"`` (labels from the model) or ``"empirical"`` (the training loss's backward).
        predictive: ``"categorical"`` (logits) or ``"gaussian"`` (unit-variance regression).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        bias: ``"folded"`` (the bias is the weight matrix's last column) or ``"separate"`` (each bias is a block
            of its own with input factor ``[[1]]``, as in the paper's code).
        eigenvalue_floor: eigenvalues below it are set to 0 before damping (the paper's code: 1e-6).
        repeated_calls: ``"expand"`` or ``"reduce"``: how a layer's calls within one forward pass combine
            (Note [repeated calls] in :mod:`kldwrm_fast.curvature.blocks`).
        predictive_module: the module whose output the loss reads, when ``model`` is part of it (the sampled
            Fisher draws its labels there); default ``model``.
        weight_sharing: ``"expand"`` or ``"reduce"``: how a Linear layer applied to ``(batch, seq, features)`` forms
            its factors over the shared dimensions (Note [weight sharing over a sequence] in
            :mod:`kldwrm_fast.curvature.blocks`).
        max_factor_dim: a factor side wider than this (an integer, or None for no limit) is kept as its diagonal,
            the other side staying dense (docs/algorithms.md §1, "diagonal sides"); an embedding's input side is
            always diagonal. Default 4096 (:data:`kldwrm_fast.optim.options.MAX_FACTOR_DIM` says why).
        eigensolver: ``"exact"`` (every refresh decomposes its factors) or ``"warm"`` (a refresh updates each dense
            factor's last eigenbasis by ``warm_iters`` steps of orthogonal iteration, 0 keeping the basis and
            refreshing its eigenvalues, and keeps it while its relative residual is at most ``warm_tol``; the first
            decomposition, a refused update and every ``full_every``-th refresh (None: none forced) are exact:
            docs/algorithms.md §6.5). Param-group entries, which may change between steps.
        damping_form: ``"eigen"`` (the damping on eigenvalue products, the paper's) or ``"factored"`` (cached damped
            inverses with Martens and Grosse's π rule, two GEMMs per block; another approximation:
            docs/algorithms.md §6.6).
        rank: None (every dense side exact) or an integer ``r`` >= 1: a dense side at least ``r`` wide keeps its top
            ``r`` eigenpairs from a warm-started randomized range finder and the mean of the rest of its spectrum,
            so its decomposition costs O(n²r) instead of O(n³) and the preconditioning O(n_out·n_in·r) instead of
            O(n_out·n_in·n) (docs/algorithms.md §6.7); not with ``damping_form="factored"``. A param-group entry: a
            change takes effect at the next inverse step.
        others, others_kwargs: a ``torch.optim`` optimizer class (and its arguments) for the parameters without a
            curvature block (:mod:`kldwrm_fast.optim.routing`); default plain gradient descent.
    """

    update_check = "kl_clip"

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        lr: float = 0.01,
        rho: float = 0.95,
        damping: float = 0.01,
        momentum: float = 0.9,
        kl_clip: Optional[float] = 0.1,
        weight_decay: float = 0.0,
        stat_freq: int = 30,
        inv_freq: int = 30,
        fisher: str = "sampled",
        predictive: str = "categorical",
        backend: str = "auto",
        bias: str = "folded",
        eigenvalue_floor: float = 0.0,
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
        damping_form: str = "eigen",
        rank: Optional[int] = None,
    ) -> None:
        options = KFACOptions(
            lr=lr, rho=rho, damping=damping, momentum=momentum, kl_clip=kl_clip, weight_decay=weight_decay,
            stat_freq=stat_freq, inv_freq=inv_freq, fisher=fisher, predictive=predictive, backend=backend, bias=bias,
            eigenvalue_floor=eigenvalue_floor, repeated_calls=repeated_calls, weight_sharing=weight_sharing,
            max_factor_dim=max_factor_dim, eigensolver=eigensolver, warm_iters=warm_iters,
            warm_tol=warm_tol, full_every=full_every, damping_form=damping_form, rank=rank,
        )  # fmt: skip
        super().__init__(model, options, predictive_module, others, others_kwargs)
        self._buffer_updates = BufferUpdates()

    def _update(self, group, plan, grads):
        lr, momentum = plan.lr, group["momentum"]
        self.estimator.refresh(plan, group["rho"], reweight=None)
        states = [self.block_state(block) for block in plan.blocks]
        directions = preconditioned(self._ops, group, plan, states, grads)  # d = P(V)
        inner = kl_clip_(directions, grads, lr, group["kl_clip"])  # d ← ν d
        if not self.numerics.update_is_finite(directions, group, self.global_state["step"], inner):
            return
        if not momentum:
            add_to_parameters(plan.blocks, directions, -lr, self.numerics)
            return
        for state, d in zip(states, directions):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(d)
        buffers = [state["momentum_buffer"] for state in states]
        heavy_ball(buffers, directions, momentum, self.numerics)  # buf ← μ buf + d
        self._buffer_updates.add(plan.blocks, buffers, -lr * (1.0 - momentum), self.numerics)  # W̄ ← W̄ − lr(1−μ) buf
