"""SO-KLD-WRM, Proposition 4.1 (with variable λ, Prop. A.1 with B = 0) — docs/algorithms.md §3 "SOKLDWRM"."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.curvature.state import store_all
from kldwrm_fast.optim.arguments import validate_positive_or_none
from kldwrm_fast.optim.base import CurvatureOptimizer


class SOKLDWRM(CurvatureOptimizer):
    """Smallest-order KLD-WRM: the EA-NG step with ``V_k`` replaced by ``V_k − (λ_k/λ_{k−1}) ρ V_{k−1}``.

    Per block: ``u = V_k − (lr_{k−1}/lr_k) ρ V_{k−1}`` (``V_{−1} = 0``), ``d = P_{Ā,Γ̄}(u)``, KL clip with
    ``Σ⟨d, u⟩``, ``W̄ ← W̄ − lr ν d``. No momentum. State per block adds ``"v_prev"`` (``V_{k−1}``).

    Args: as :class:`~kldwrm_fast.KFAC` without ``momentum`` (paper default ``rho=0.33``).
    """

    _kl_clip_checks_gradients = True

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
    ) -> None:
        validate_positive_or_none("kl_clip", kl_clip)
        defaults = dict(
            lr=lr, rho=rho, damping=damping, kl_clip=kl_clip, weight_decay=weight_decay,
            stat_freq=stat_freq, inv_freq=inv_freq, eigenvalue_floor=eigenvalue_floor,
        )  # fmt: skip
        super().__init__(
            model, defaults, fisher, predictive, backend, bias,
            repeated_calls=repeated_calls, predictive_module=predictive_module, others=others,
            others_kwargs=others_kwargs,
        )  # fmt: skip

    def _update(self, group, blocks, grads, info):
        lr = info.lr
        self.estimator.refresh(blocks, info, group["rho"], reweight=None)
        lr_prev = self.global_state["lr_prev"]
        states = [self.block_state(block) for block in blocks]
        # λ_k/λ_{k−1} = lr_{k−1}/lr_k is taken as 0 across a zero lr on either side: the recursion restarts.
        coef = group["rho"] * lr_prev / lr if lr_prev and lr else 0.0
        differences = grads
        if coef and all("v_prev" in state for state in states) and not torch.compiler.is_compiling():
            # (compiled: one op per block, so that coef, which follows the lr, is not specialised; see scale_)
            differences = torch._foreach_sub(grads, torch._foreach_mul([state["v_prev"] for state in states], coef))
        elif coef:
            differences = [v - coef * s["v_prev"] if "v_prev" in s else v for s, v in zip(states, grads)]
        directions = info.batches.precondition(self._ops, states, differences, group["damping"])
        if not self._kl_clipped_and_finite(directions, differences, lr, group):
            return
        # zero after a rejected plain step: the recursion restarts
        store_all(states, "v_prev", [self._masked(v) for v in grads])
        self._add_to_parameters(blocks, directions, -lr)
