"""SO-KLD-WRM, Proposition 4.1 (with variable λ, Prop. A.1 with B = 0) — docs/algorithms.md §3 "SOKLDWRM"."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.curvature.state import store_all
from kldwrm_fast.ops import tracing
from kldwrm_fast.optim.base import CurvatureOptimizer
from kldwrm_fast.optim.options import FULL_EVERY, MAX_FACTOR_DIM, WARM_TOL, SOOptions
from kldwrm_fast.optim.updates import add_to_parameters, kl_clip_, preconditioned, recursion_ratio


class SOKLDWRM(CurvatureOptimizer):
    """Smallest-order KLD-WRM: the EA-NG step with ``V_k`` replaced by ``V_k − (λ_k/λ_{k−1}) ρ V_{k−1}``.

    Per block: ``u = V_k − (lr_{k−1}/lr_k) ρ V_{k−1}`` (``V_{−1} = 0``), ``d = P_{Ā,Γ̄}(u)``, KL clip with
    ``Σ⟨d, u⟩``, ``W̄ ← W̄ − lr ν d``. No momentum. State per block adds ``"v_prev"`` (``V_{k−1}``).

    Args: as :class:`~kldwrm_fast.KFAC` without ``momentum`` (paper default ``rho=0.33``).
    """

    update_check = "kl_clip"

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        lr: float = 0.01,
        rho: float = 0.33,
        damping: float = 0.01,
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
        options = SOOptions(
            lr=lr, rho=rho, damping=damping, kl_clip=kl_clip, weight_decay=weight_decay, stat_freq=stat_freq,
            inv_freq=inv_freq, fisher=fisher, predictive=predictive, backend=backend, bias=bias,
            eigenvalue_floor=eigenvalue_floor, repeated_calls=repeated_calls, weight_sharing=weight_sharing,
            max_factor_dim=max_factor_dim, eigensolver=eigensolver, warm_iters=warm_iters,
            warm_tol=warm_tol, full_every=full_every, damping_form=damping_form, rank=rank,
        )  # fmt: skip
        super().__init__(model, options, predictive_module, others, others_kwargs)

    def _update(self, group, plan, grads):
        lr = plan.lr
        self.estimator.refresh(plan, group["rho"], reweight=None)
        states = [self.block_state(block) for block in plan.blocks]
        coef = recursion_ratio(group["rho"], self.global_state["lr_prev"], lr)  # ρ λ_k/λ_{k−1}
        differences = grads  # u = V_k − coef · V_{k−1}
        if coef and all("v_prev" in state for state in states) and not tracing():
            # (compiled: one op per block, so that coef, which follows the lr, is not specialised; see scale_)
            differences = torch._foreach_sub(grads, torch._foreach_mul([state["v_prev"] for state in states], coef))
        elif coef:
            differences = [v - coef * s["v_prev"] if "v_prev" in s else v for s, v in zip(states, grads)]
        directions = preconditioned(self._ops, group, plan, states, differences)  # d = P(u)
        inner = kl_clip_(directions, differences, lr, group["kl_clip"])
        if not self.numerics.update_is_finite(directions, group, self.global_state["step"], inner):
            return
        # zero after a rejected plain step: the recursion restarts
        store_all(states, "v_prev", [self.numerics.mask(v) for v in grads])
        add_to_parameters(plan.blocks, directions, -lr, self.numerics)
