"""Factored Tikhonov damping (docs/algorithms.md §6.6): K-FAC and SO precondition with cached damped inverses
``(Γ̄ + α_Γ I)⁻¹ V (Ā + α_A I)⁻¹`` (two GEMMs per block) instead of the eigenbasis form (four), with Martens and
Grosse's π rule: ``α_Γ α_A = δ`` and ``α_A / α_Γ = π² = (tr Ā / n_in) / (tr Γ̄ / n_out)``.

The inverses are made from the factors' eigendecompositions, ``Q diag(1 / (d + α)) Qᵀ`` (one GEMM per factor), on
every inverse step, when the damping changed since they were made, and when the state has none (a checkpoint saved
with the eigenbasis form); between those they are reused. A diagonal side's inverse is the vector ``1 / (d + α)``.
State keys: ``G_inv`` (n_out, n_out), ``A_inv`` (n_in, n_in) (or their diagonals) and ``inverse_damping``, the δ
they were made with.
"""

from __future__ import annotations

from torch import Tensor

from kldwrm_fast.curvature.joint import damping_split
from kldwrm_fast.curvature.state import store
from kldwrm_fast.ops import reference

DAMPING_FORMS = ("eigen", "factored")


def damped_inverse(q: Tensor, d: Tensor, alpha: Tensor) -> Tensor:
    """``(Q diag(d) Qᵀ + α I)⁻¹ = Q diag(1 / (d + α)) Qᵀ`` (n, n), exactly symmetric; for a diagonal side (``q`` the
    identity's empty marker) the vector ``1 / (d + α)`` (n,)."""
    scale = (d + alpha).reciprocal()
    if q.dim() < d.dim() + 1:
        return scale
    inverse = (q * scale.unsqueeze(-2)) @ q.transpose(-1, -2)
    return 0.5 * (inverse + inverse.transpose(-1, -2))


def refresh_inverses(states: list[dict], damping: float, inverse_step: bool) -> None:
    """Make each block's damped inverses where they are stale (see the module docstring)."""
    for state in states:
        if not inverse_step and state.get("inverse_damping") == damping and "A_inv" in state:
            continue
        alpha_g, alpha_a = damping_split(state["dG"], state["dA"], damping)
        store(state, "G_inv", damped_inverse(state["QG"], state["dG"], alpha_g))
        store(state, "A_inv", damped_inverse(state["QA"], state["dA"], alpha_a))
        state["inverse_damping"] = damping


def precondition(states: list[dict], vs: list[Tensor]) -> list[Tensor]:
    """``(Γ̄ + α_Γ I)⁻¹ V (Ā + α_A I)⁻¹`` per block from its cached inverses (either side possibly diagonal)."""
    return [reference.sandwich(state["G_inv"], v, state["A_inv"]) for state, v in zip(states, vs, strict=True)]
