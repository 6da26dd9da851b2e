"""Q-KLD-WRM, Proposition 4.2 / A.1 with the reweighted-factor approximation (S82)–(S89) — SPEC §3."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.optim.base import CurvatureOptimizer, validate_positive_or_none


class QKLDWRM(CurvatureOptimizer):
    ghat_growth_limit: Optional[float] = 100.0
    ghat_report_every: int = 100
    _ghat_reset_counts: Optional[torch.Tensor] = None  # per block, on the device
    _ghat_reported_counts: tuple = ()  # the counts last reported, on the host

    """Quadratic KLD-WRM.

    Per block, with ``λ_k = 1/lr_k`` and ``c_k = (1−ρ) + lr_k``::

        Â_k = ρ Ā_{k−1} + c_k A_k,   Γ̂_k = ρ Γ̄_{k−1} + c_k Γ_k          (decomposed on inverse steps)
        Ĝ_0 = V_0,   Ĝ_k = V_k + (λ_k/λ_{k−1}) ρ (Ĝ_{k−1} − V_{k−1} − M_{k−1})
        S_k = −lr_k P_{Â,Γ̂}(Ĝ_k),   M_k = −λ_k Γ̄_k S_k Ā_k
        W̄ ← W̄ + clip(S_k),  clip: scale by τ/r when r = ‖S_k‖/(lr_k √numel) > τ

    The recursion always uses the unclipped ``S_k``. State per block adds ``"g_hat"``, ``"v_prev"``, ``"m"``.

    Growth guard: the paper (Sec. 4.3) bounds ``Ĝ`` when ``ρ‖I − M̂_k‖ ≤ δ < 1``. As a cheap proxy, a block
    whose ``‖Ĝ_k‖ > ghat_growth_limit · ‖V_k‖`` (or is not finite) restarts its recursion from
    ``Ĝ_k = V_k``, counted in :attr:`ghat_resets` (``ghat_growth_limit = None`` disables it). The check and
    the restart run on the device without a host synchronisation; resets are counted there and reported
    (a warning naming the blocks) on inverse steps, which wait for the eigensolver anyway, at least every
    ``ghat_report_every`` steps, and whenever :attr:`ghat_resets` is read.

    Args: as :class:`~kldwrm_fast.KFAC` with ``clip`` (τ > 0 or None, default 2.0) in place of ``momentum``
    and ``kl_clip``; paper default ``rho=0.5``.
    """

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
    ) -> None:
        validate_positive_or_none("clip", clip)
        defaults = dict(
            lr=lr, rho=rho, damping=damping, clip=clip, weight_decay=weight_decay,
            stat_freq=stat_freq, inv_freq=inv_freq,
        )  # fmt: skip
        super().__init__(model, defaults, fisher, predictive, backend)

    @property
    def ghat_resets(self) -> int:
        """How many times a block's recursion restarted (reads the device-side counts: a host sync)."""
        self._report_resets()
        return sum(self._ghat_reported_counts)

    def _guard_recursion(self, states: list[dict], grads) -> None:
        """Restart, on the device, the recursion of blocks whose ``Ĝ`` outgrew ``V`` (see the class docstring)."""
        g_hats = [s["g_hat"] for s in states]
        g_norms = torch.stack(torch._foreach_norm(g_hats))
        v_norms = torch.stack(torch._foreach_norm(grads))
        violated = ~(g_norms <= self.ghat_growth_limit * v_norms)  # also true where Ĝ is not finite
        for index, (g_hat, v) in enumerate(zip(g_hats, grads)):
            g_hat.copy_(torch.where(violated[index], v, g_hat))
        counts = self._ghat_reset_counts
        self._ghat_reset_counts = violated.to(torch.int64) if counts is None else counts + violated

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
        """Advance the recursion to ``Ĝ_k`` and return the unclipped steps ``S_k`` (stores ``M_k``)."""
        rho, lr = group["rho"], info.lr
        self._refresh_curvature(group, blocks, info, reweight=(1.0 - rho) + lr)
        states = [self.block_state(block) for block in blocks]
        lr_prev = self.global_state["lr_prev"]
        if lr_prev is None:
            for state, v in zip(states, grads):
                state["g_hat"], state["v_prev"] = v.clone(), v.clone()
        else:
            self._ops.ghat_recursion(
                grads, [s["g_hat"] for s in states], [s["v_prev"] for s in states], [s["m"] for s in states],
                rho * lr_prev / lr,
            )  # fmt: skip
            if self.ghat_growth_limit is not None:
                self._guard_recursion(states, grads)
                if info.inverse_due or self.global_state["step"] % self.ghat_report_every == 0:
                    self._report_resets()
        steps, products = self._batches.q_steps(self._ops, states, [s["g_hat"] for s in states], group["damping"], lr)
        for state, product in zip(states, products):
            state["m"] = product
        return steps

    def _apply_clipped(self, group, blocks, steps, lr) -> None:
        """``W̄ ← W̄ + clip(S)``, with all blocks' scales ``min(1, τ/r)`` computed at once on the device."""
        tau = group["clip"]
        if tau is None:
            for block, step in zip(blocks, steps):
                block.add_(step)
            return
        # r/τ = ‖S‖ / (τ lr √numel); the scale is min(1, τ/r).
        ratios = torch._foreach_div(torch._foreach_norm(steps), [tau * lr * math.sqrt(s.numel()) for s in steps])
        scales = torch.stack(ratios).reciprocal_().clamp_(max=1.0)
        for block, step, scale in zip(blocks, steps, scales.unbind()):
            block.add_(step.mul_(scale))

    def _update(self, group, blocks, grads, info):
        lr = info.lr
        steps = self._q_steps(group, blocks, grads, info)
        self._apply_clipped(group, blocks, steps, lr)
