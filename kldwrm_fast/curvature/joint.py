"""The exact inverse of Q-KLD-WRM's two-term Kronecker sum, eq. (81) (``curvature_sum="exact"``, the paper's
"approach 1"; docs/algorithms.md §3).

Per block, with the averages ``Ā, Γ̄``, the local factors ``A, Γ`` and ``lr = 1/λ``::

    K = Ā ⊗ Γ̄ + lr · A ⊗ Γ + δ I

Each side's pair is diagonalised at once (a generalised symmetric eigenproblem): with ``Ā = Q diag(d) Qᵀ``
(the average's eigendecomposition, which the Q family keeps anyway), ``p = d + α`` and the whitening
``W = Q diag(p)^{-1/2}`` (so ``Wᵀ (Ā + α I) W = I``), the eigendecomposition ``Wᵀ A W = U diag(s) Uᵀ`` gives the
joint basis ``E = W U``: ``Eᵀ A E = diag(s)`` and ``Eᵀ (Ā + α I) E = I``. In the basis ``E_Γ ⊗ E_A``::

    Eᵀ Ā E = I − α EᵀE,   EᵀE = Uᵀ diag(1/p) U

so the two-term sum ``Ā ⊗ Γ̄ + lr A ⊗ Γ`` is ``(E_Γ ⊗ E_A)⁻ᵀ [(I − α_Γ H_Γ) ⊗ (I − α_A H_A) + lr s_Γ s_Aᵀ]
(E_Γ ⊗ E_A)⁻¹`` with ``H = EᵀE = Uᵀ diag(1/p) U``: diagonal when ``α = 0``, i.e. without damping. The damping
``δ I = (E_Γ ⊗ E_A)⁻ᵀ (δ H_Γ ⊗ H_A) (E_Γ ⊗ E_A)⁻¹`` is not diagonal there (no basis diagonalises three Kronecker
terms at once), so ``u = K⁻¹ vec(V)`` comes from conjugate gradients in the joint basis, preconditioned by the
operator's diagonal ``a_Γ a_Aᵀ + lr s_Γ s_Aᵀ + δ h_Γ h_Aᵀ`` (``a = diag(EᵀĀE)``, ``h = diag(H)``), started from
that diagonal's solution, until the residual is at rounding level. The start is already exact without damping,
and wherever a local factor commutes with its average (in particular equals it: eq. (20), and step 0), where
``δ`` is then added to the eigenvalue products as in the reweighted mode. Each iteration costs three GEMMs per
block.

The split ``α_A α_Γ = δ``, ``α_A / α_Γ = π²`` with K-FAC's ``π = sqrt(mean d_A / mean d_Γ)`` only chooses the
basis (keeping it invariant to rescaling ``A ⊗ Γ = cA ⊗ Γ/c``), which sets how fast the iterations converge;
with ``δ = 0`` the whitening is by the average itself, whose zero eigenvalues then make the step non-finite (as
they make the reweighted mode's).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kldwrm_fast.ops import reference


def damping_split(d_g: Tensor, d_a: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``(α_Γ, α_A)``, each (..., 1): ``α_Γ α_A = δ`` with ``α_A/α_Γ = π²``, ``π² = mean d_A / mean d_Γ`` (1 where a
    mean is 0). ``d_g``, ``d_a``: the averages' eigenvalues, (..., n_out) and (..., n_in)."""
    mean_g, mean_a = d_g.mean(-1, keepdim=True), d_a.mean(-1, keepdim=True)
    both = (mean_g > 0) & (mean_a > 0)
    pi = torch.where(both, (mean_a / torch.where(both, mean_g, 1.0)).sqrt(), 1.0)
    root = math.sqrt(damping)
    return root / pi, root * pi


def whitening(q: Tensor, d: Tensor, alpha: Tensor) -> Tensor:
    """``W = Q diag(d + α)^{-1/2}`` (..., n, n), so that ``Wᵀ (X̄ + α I) W = I`` for ``X̄ = Q diag(d) Qᵀ``; for a
    diagonal side (``q`` the identity's marker) its diagonal (..., n)."""
    scale = (d + alpha).rsqrt()
    return scale if q.dim() < d.dim() + 1 else q * scale.unsqueeze(-2)


def whitened_local(local: Tensor, q: Tensor, d: Tensor, alpha: Tensor) -> Tensor:
    """``Wᵀ X W`` (..., n, n), exactly symmetric: the local factor ``X`` in the whitened basis of its average; for a
    diagonal side (``local`` its diagonal, (..., n)) the diagonal ``X ⊘ (d + α)``."""
    if local.dim() == d.dim():
        return local / (d + alpha)
    w = whitening(q, d, alpha)
    c = torch.matmul(torch.matmul(w.transpose(-1, -2), local), w)
    return (c + c.transpose(-1, -2)) * 0.5


def joint_basis(q: Tensor, d: Tensor, u: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(E, a, h)`` of one side: the joint basis ``E = W U`` (..., n, n) and the diagonals ``a`` of ``EᵀX̄E`` and
    ``h`` of ``EᵀE`` (..., n), from the average's ``(Q, d)`` and the whitened local factor's eigenvectors ``U``. A
    diagonal side's ``E`` is diagonal, ``diag(d + α)^{-1/2}``, returned as that vector (Note [diagonal sides] in
    :mod:`kldwrm_fast.ops.reference`)."""
    p = d + alpha
    if u.dim() < d.dim() + 1:
        return p.rsqrt(), d / p, p.reciprocal()
    weights = u * u  # column j: the squared entries of U's j-th eigenvector, summing to 1
    a = torch.matmul((d / p).unsqueeze(-2), weights).squeeze(-2)
    h = torch.matmul(p.reciprocal().unsqueeze(-2), weights).squeeze(-2)
    return torch.matmul(whitening(q, d, alpha), u), a, h


def tolerance(dtype: torch.dtype) -> float:
    """The relative residual at which the conjugate gradients stop: ``ε^{3/4}`` of ``dtype`` (1.8e-12 in float64,
    6.4e-6 in float32), well below what the step's other rounding allows."""
    return torch.finfo(dtype).eps ** 0.75


def _conjugate_gradient(apply, rhs: Tensor, inverse_diagonal: Tensor, max_iterations: int) -> tuple[Tensor, int]:
    """Preconditioned conjugate gradients on batched (..., n, m) systems, from ``inverse_diagonal ⊙ rhs``, until every
    system's residual is below :func:`tolerance` relative to its right-hand side or after ``max_iterations``
    (one host check per iteration: this runs on inverse steps, which wait for the eigensolver anyway).

    Returns ``(solution, iterations run)``.
    """
    inner = lambda x, y: (x * y).sum((-2, -1), keepdim=True)  # noqa: E731
    targets = tolerance(rhs.dtype) * rhs.flatten(-2).norm(dim=-1)
    solution = inverse_diagonal * rhs
    residual = rhs - apply(solution)
    preconditioned = inverse_diagonal * residual
    direction = preconditioned
    rz = inner(residual, preconditioned)
    for iteration in range(max_iterations):
        if (residual.flatten(-2).norm(dim=-1) <= targets).all():
            return solution, iteration
        applied = apply(direction)
        curvature = inner(direction, applied)
        alpha = torch.where(curvature > 0, rz / torch.where(curvature > 0, curvature, 1.0), 0.0)
        solution = solution + alpha * direction
        residual = residual - alpha * applied
        preconditioned = inverse_diagonal * residual
        rz_next = inner(residual, preconditioned)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, 1.0), 0.0)
        direction = preconditioned + beta * direction
        rz = rz_next
    return solution, max_iterations


def exact_step(
    q_g: Tensor, d_g: Tensor, u_g: Tensor, s_g: Tensor, q_a: Tensor, d_a: Tensor, u_a: Tensor, s_a: Tensor,
    ea_g: Tensor, ea_a: Tensor, g_hat: Tensor, damping: float, lr: float, max_iterations: int,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Q-KLD-WRM's step and curvature product with ``K = Ā ⊗ Γ̄ + lr A ⊗ Γ + δ I`` solved in the joint basis
    (module docstring).

    Args:
        q_g, d_g, q_a, d_a: eigendecompositions of the averages ``Γ̄``, ``Ā`` (clamped, floored eigenvalues).
        u_g, s_g, u_a, s_a: eigendecompositions of the whitened local factors (:func:`whitened_local`).
        ea_g, ea_a: the averages ``Γ̄`` (..., n_out, n_out) and ``Ā`` (..., n_in, n_in).
        g_hat: (..., n_out, n_in) the recursion gradient ``Ĝ_k``.
        damping: δ ≥ 0; lr: ``1/λ_k`` > 0.
        max_iterations: the most conjugate-gradient iterations for the damping (none run when ``δ = 0``).

    Returns:
        ``(S, M)``: ``S = −lr K⁻¹ Ĝ`` (unclipped step) and ``M = −λ Γ̄ S Ā = (Ā ⊗ Γ̄) K⁻¹ Ĝ`` (eq. (80)), both
        (..., n_out, n_in). Six GEMMs, as the reweighted mode's step, plus two and three per iteration.
    """
    alpha_g, alpha_a = damping_split(d_g, d_a, damping)
    e_g, a_g, h_g = joint_basis(q_g, d_g, u_g, alpha_g)
    e_a, a_a, h_a = joint_basis(q_a, d_a, u_a, alpha_a)
    outer = lambda x, y: x.unsqueeze(-1) * y.unsqueeze(-2)  # noqa: E731
    lr_s = lr * outer(s_g, s_a)
    inverse_diagonal = (outer(a_g, a_a) + lr_s + damping * outer(h_g, h_a)).reciprocal_()
    t = lambda e: e if reference.is_diagonal(e, g_hat) else e.transpose(-1, -2)  # noqa: E731  (Eᵀ)
    projected = reference.sandwich(t(e_g), g_hat, e_a)
    if damping > 0 and max_iterations > 0:
        full_g = reference.left(t(e_g), e_g) if e_g.dim() == g_hat.dim() else e_g * e_g
        full_a = reference.left(t(e_a), e_a) if e_a.dim() == g_hat.dim() else e_a * e_a
        alpha_g, alpha_a = alpha_g.unsqueeze(-1), alpha_a.unsqueeze(-1)

        def apply(x: Tensor) -> Tensor:  # (I − α_Γ H_Γ) X (I − α_A H_A) + lr s_Γ s_Aᵀ ⊙ X + δ H_Γ X H_A
            left = reference.left(full_g, x)
            both = reference.right(left, full_a)
            return x - alpha_g * left - alpha_a * reference.right(x, full_a) + 2 * damping * both + lr_s * x

        solved, _ = _conjugate_gradient(apply, projected, inverse_diagonal, max_iterations)
    else:
        solved = projected * inverse_diagonal
    solved = reference.sandwich(e_g, solved, t(e_a))
    product = reference.sandwich(ea_g, solved, ea_a)
    return solved.mul_(-lr), product
