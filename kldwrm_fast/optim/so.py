"""SO-KLD-WRM, Proposition 4.1 (with variable λ, Prop. A.1 with B = 0) — SPEC §3 "SOKLDWRM"."""

from __future__ import annotations

from typing import Optional, Union

from torch import nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.optim.base import CurvatureOptimizer, kl_clip_factor, validate_positive_or_none


class SOKLDWRM(CurvatureOptimizer):
    """Smallest-order KLD-WRM: the EA-NG step with ``V_k`` replaced by ``V_k − (λ_k/λ_{k−1}) ρ V_{k−1}``.

    Per block: ``u = V_k − (lr_{k−1}/lr_k) ρ V_{k−1}`` (``V_{−1} = 0``), ``d = P_{Ā,Γ̄}(u)``, KL clip with
    ``Σ⟨d, u⟩``, ``W̄ ← W̄ − lr ν d``. No momentum. State per block adds ``"v_prev"`` (``V_{k−1}``).

    Args: as :class:`~kldwrm_fast.KFAC` without ``momentum`` (paper default ``rho=0.33``).
    """

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
    ) -> None:
        validate_positive_or_none("kl_clip", kl_clip)
        defaults = dict(
            lr=lr, rho=rho, damping=damping, kl_clip=kl_clip, weight_decay=weight_decay,
            stat_freq=stat_freq, inv_freq=inv_freq,
        )  # fmt: skip
        super().__init__(model, defaults, fisher, predictive, backend)

    def _update(self, group, blocks, grads, info):
        lr = info.lr
        self._refresh_curvature(group, blocks, info, reweight=None)
        lr_prev = self.global_state["lr_prev"]
        coef = 0.0 if lr_prev is None else group["rho"] * lr_prev / lr
        states = self.block_states()
        differences = []
        for state, v in zip(states, grads):
            differences.append(v if lr_prev is None else v - coef * state["v_prev"])
            state["v_prev"] = v
        directions = self._batches.precondition(self._ops, states, differences, group["damping"])
        nu = kl_clip_factor(directions, differences, lr, group["kl_clip"])
        for block, d in zip(blocks, directions):
            block.add_(d if nu is None else d.mul_(nu), alpha=-lr)
