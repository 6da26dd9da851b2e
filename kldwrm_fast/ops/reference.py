"""PyTorch reference implementations of the fused operations of docs/algorithms.md §6.

These functions are the executable specification: the CPU path, the fallback on CUDA tensors, and the
oracle that every Triton or CUDA kernel is tested against. Each works on a single block (2-D tensors) or
on a batch of blocks of equal shape (a leading batch dimension), and computes in the dtype of its inputs.

Note [diagonal sides]
    A factor side kept diagonal (an embedding's input side, a side wider than ``max_factor_dim``;
    docs/algorithms.md §1) is held as its diagonal, a tensor with one dimension fewer than the block-form matrix
    it meets: an average or local factor ``(..., n)``, eigenvalues ``(..., n)`` as for a dense side, and its
    eigenvectors, the identity, as the empty ``(..., 0)`` marker. Every product with a factor or with eigenvectors
    here (:func:`left`, :func:`right`, :func:`rotate`, :func:`unrotate`) reads a tensor of one dimension fewer that
    way: an element-wise scaling, or nothing, instead of a GEMM. The fused kernels take dense sides only; blocks
    with a diagonal side run these functions on every backend (:class:`kldwrm_fast.curvature.batching.BlockBatches`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kldwrm_fast.ops.tracing import tracing


def is_diagonal(factor: Tensor, matrix: Tensor) -> bool:
    """Whether ``factor`` (a factor, average or eigenvector tensor) is a diagonal side's form next to the block-form
    ``matrix`` (Note [diagonal sides])."""
    return factor.dim() < matrix.dim()


def left(factor: Tensor, matrix: Tensor) -> Tensor:
    """``Y M`` for an output-side factor ``Y`` (..., n_out, n_out) or its diagonal (..., n_out), and (..., n_out, m)."""
    return factor.unsqueeze(-1) * matrix if is_diagonal(factor, matrix) else torch.matmul(factor, matrix)


def right(matrix: Tensor, factor: Tensor) -> Tensor:
    """``M X`` for (..., m, n_in) and an input-side factor ``X`` (..., n_in, n_in), or its diagonal (..., n_in)."""
    return matrix * factor.unsqueeze(-2) if is_diagonal(factor, matrix) else torch.matmul(matrix, factor)


def sandwich(g: Tensor, s: Tensor, a: Tensor) -> Tensor:
    """``Γ S A``, the curvature ``Γ ⊗ A`` applied to a block-form ``S`` (either factor possibly diagonal)."""
    return right(left(g, s), a)


def diagonal_local(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """The diagonal ``scale · diag(xᵀx)`` (n,) of a diagonal side's local factor from (rows, n) ``x`` in ``dtype``;
    a 1-D ``x`` is already ``diag(xᵀx)`` (an embedding's token counts)."""
    x = x.to(dtype)
    return (x if x.dim() == 1 else (x * x).sum(0)) * scale


def gram(x: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``S = scale · xᵀx`` for (rows, n) ``x`` cast to ``dtype``, made exactly symmetric, (n, n)."""
    x = x.to(dtype)
    local = torch.matmul(x.transpose(-1, -2), x).mul_(scale)
    return 0.5 * (local + local.transpose(-1, -2))


def fold(
    local: Tensor, ea: Tensor, reweighted: Tensor, rho: float, reweight: float, first: bool, with_reweighted: bool
) -> None:
    """The two epilogues of :func:`factor_update` for a given local factor ``S`` (in place on ``ea``/``reweighted``)."""
    if first:
        ea.copy_(local)
    if with_reweighted:
        torch.add(rho * ea, local, alpha=reweight, out=reweighted)
    ea.mul_(rho).add_(local, alpha=1.0 - rho)


def factor_update(
    x: Tensor,
    ea: Tensor,
    reweighted: Tensor,
    scale: float,
    rho: float,
    reweight: float,
    first: bool,
    with_reweighted: bool,
) -> Tensor:
    """Local Kronecker factor and its exponential averages from captured rows, in one pass (docs/algorithms.md §2).

    Args:
        x: (rows, n) captured rows (``ā`` or output gradients ``e``), any float dtype; cast to ``ea.dtype``.
        ea: (n, n) symmetric average ``X̄``, overwritten with ``ρ X̄ + (1−ρ) S``.
        reweighted: (n, n) output buffer, overwritten with ``X̂ = ρ X̄_old + c S`` when ``with_reweighted``
            (untouched otherwise; any tensor, e.g. empty, may be passed then).
        scale: ``S = scale · xᵀx`` (``1/rows`` for ``A``; the batch size ``m`` for ``Γ`` built from gradients
            of the mean loss, since ``Γ = (m e)ᵀ(m e)/m``).
        rho: decay ρ in [0, 1).
        reweight: ``c`` of (S82)–(S83).
        first: this is the first statistic, so the average starts from it (``X̄_{−1} := S``).
        with_reweighted: whether to write ``reweighted``.

    Returns:
        The local factor ``S`` (n, n), exactly symmetric, dtype of ``ea``.
    """
    local = gram(x, scale, ea.dtype)
    fold(local, ea, reweighted, rho, reweight, first, with_reweighted)
    return local


def precondition(q_g: Tensor, d_g: Tensor, q_a: Tensor, d_a: Tensor, v: Tensor, damping: float) -> Tensor:
    """Eigen-preconditioning ``P_{A,Γ}(V) = Q_Γ [(Q_Γᵀ V Q_A) ⊘ (d_Γ d_Aᵀ + δ)] Q_Aᵀ`` (docs/algorithms.md §1).

    Args:
        q_g, d_g: eigenvectors (..., n_out, n_out) and clamped eigenvalues (..., n_out) of the output
            factor ``Y``.
        q_a, d_a: the same for the input factor ``X`` (..., n_in, n_in), (..., n_in).
        v: (..., n_out, n_in) block-form gradient.
        damping: δ ≥ 0, added to every eigenvalue product.

    Returns:
        (..., n_out, n_in) tensor ``≈ (Y ⊗ X + δ I)⁻¹ vec(V)`` in matrix form, dtype of ``v``.
    """
    return divided_precondition(q_g, q_a, damped(eigenvalue_products(d_g, d_a), 1.0, damping), v)


def eigenvalue_products(d_g: Tensor, d_a: Tensor) -> Tensor:
    """``d_Γ d_Aᵀ`` (..., n_out, n_in): the eigenvalues of ``Y ⊗ X`` in block form."""
    return d_g.unsqueeze(-1) * d_a.unsqueeze(-2)


def damped(products: Tensor, scale: float, damping: float) -> Tensor:
    """``scale · products + δ``, the denominator of the preconditioners below (a new tensor; ``scale = 1`` skips
    the multiplication, which would leave every value as it is)."""
    return (products if scale == 1.0 else products * scale) + damping


def divided_precondition(q_g: Tensor, q_a: Tensor, denominator: Tensor, v: Tensor) -> Tensor:
    """:func:`precondition` with its denominator ``d_Γ d_Aᵀ + δ`` (:func:`damped`) made beforehand:
    ``Q_Γ [(Q_Γᵀ V Q_A) ⊘ denominator] Q_Aᵀ``, the same operations on the same values."""
    return unrotate(q_g, q_a, rotate(q_g, q_a, v).div_(denominator))


def q_precondition(
    q_g: Tensor,
    d_g: Tensor,
    q_a: Tensor,
    d_a: Tensor,
    g_hat: Tensor,
    damping: float,
    lr: float,
    ea_g: Tensor,
    ea_a: Tensor,
) -> tuple[Tensor, Tensor]:
    """Q-KLD-WRM step and its curvature product (docs/algorithms.md §3, (S87)/(S89)).

    Args:
        q_g, d_g, q_a, d_a: eigendecompositions of the reweighted factors ``Γ̂``, ``Â``.
        g_hat: (..., n_out, n_in) the recursion gradient ``Ĝ_k``.
        damping: δ ≥ 0.
        lr: ``1/λ_k`` > 0.
        ea_g, ea_a: the current averages ``Γ̄_k`` (..., n_out, n_out) and ``Ā_k`` (..., n_in, n_in).

    Returns:
        ``(S, M)`` with ``S = −lr · P_{Â,Γ̂}(Ĝ)`` (unclipped step) and ``M = −λ Γ̄ S Ā``.
    """
    step = precondition(q_g, d_g, q_a, d_a, g_hat, damping).mul_(-lr)
    product = sandwich(ea_g, step, ea_a).mul_(-1.0 / lr)
    return step, product


def rotate(q_g: Tensor, q_a: Tensor, v: Tensor) -> Tensor:
    """``Q_Γᵀ V Q_A``: a block-form matrix (..., n_out, n_in) in the eigenbasis of its factors (a diagonal side's
    marker is the identity: Note [diagonal sides]). A new tensor, which callers may write."""
    if is_diagonal(q_g, v) and is_diagonal(q_a, v):
        return v.clone()
    if not is_diagonal(q_g, v):
        v = torch.matmul(q_g.transpose(-1, -2), v)
    return v if is_diagonal(q_a, v) else torch.matmul(v, q_a)


def unrotate(q_g: Tensor, q_a: Tensor, r: Tensor) -> Tensor:
    """``Q_Γ R Q_Aᵀ``: the inverse of :func:`rotate` (the eigenvector matrices are orthogonal); a new tensor."""
    if is_diagonal(q_g, r) and is_diagonal(q_a, r):
        return r.clone()
    if not is_diagonal(q_g, r):
        r = torch.matmul(q_g, r)
    return r if is_diagonal(q_a, r) else torch.matmul(r, q_a.transpose(-1, -2))


def q_cached_step(
    q_g: Tensor, d_g: Tensor, q_a: Tensor, d_a: Tensor, rotated: Tensor, damping: float, lr: float,
    scale_g: float, scale_a: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Q-KLD-WRM on a step without new statistics, with ``Ĝ`` carried in the averages' eigenbasis
    (docs/algorithms.md §3).

    Args:
        q_g, d_g, q_a, d_a: eigendecompositions of the averages ``Γ̄_j``, ``Ā_j`` of the last inverse step.
        rotated: (..., n_out, n_in) ``Q_Γᵀ Ĝ_k Q_A``.
        scale_g, scale_a: the reweighting of the eigenvalues, ``Γ̂_k = scale_g Γ̄_j``, ``Â_k = scale_a Ā_j``.

    Returns:
        ``(S, M̃)``: the unclipped step ``S = −lr Q_Γ [R ⊘ (s_Γ s_A d_Γ d_Aᵀ + δ)] Q_Aᵀ`` in the parameter
        basis, and ``M̃ = Q_Γᵀ M Q_A = (d_Γ d_Aᵀ) ⊙ R ⊘ (s_Γ s_A d_Γ d_Aᵀ + δ)`` (``M = −λ Γ̄_j S Ā_j`` is
        diagonal there) in the eigenbasis. Two GEMMs, as for ``P`` without its rotation.
    """
    products = eigenvalue_products(d_g, d_a)
    return q_divided_step(q_g, q_a, products, damped(products, scale_g * scale_a, damping), rotated, lr)


def q_divided_step(
    q_g: Tensor, q_a: Tensor, products: Tensor, denominator: Tensor, rotated: Tensor, lr: float
) -> tuple[Tensor, Tensor]:
    """:func:`q_cached_step` with ``d_Γ d_Aᵀ`` (:func:`eigenvalue_products`) and its denominator (:func:`damped`)
    made beforehand; neither is written."""
    scaled = rotated / denominator
    return unrotate(q_g, q_a, scaled).mul_(-lr), products * scaled


def ghat_recursion(
    v_new: Sequence[Tensor], g_hat: Sequence[Tensor], v_prev: Sequence[Tensor], m: Sequence[Tensor], coef: float
) -> None:
    """The Ĝ recursion (S103) over many tensors: ``Ĝ ← V_new + coef·(Ĝ − V_prev − M)``, ``V_prev ← V_new``.

    ``coef = (λ_{k+1}/λ_k) ρ``. ``g_hat`` and ``v_prev`` are written in place; all lists are aligned and each
    quadruple shares one shape and dtype.
    """
    if not (len(v_new) == len(g_hat) == len(v_prev) == len(m)):
        raise ValueError("ghat_recursion: v_new, g_hat, v_prev and m must have the same length")
    if not g_hat:
        return
    # Multi-tensor ops: five launches for all blocks on a GPU, the same element-wise arithmetic as a loop.
    torch._foreach_sub_(g_hat, v_prev)
    torch._foreach_sub_(g_hat, m)
    scale_(g_hat, coef)
    torch._foreach_add_(g_hat, v_new)
    torch._foreach_copy_(v_prev, v_new)


def scale_(tensors: Sequence[Tensor], scalar: float) -> None:
    """``t ← scalar · t`` for every tensor, in place: one multi-tensor op, or, while torch.compile traces, one op per
    tensor. The compiler specialises a Python float passed to a multi-tensor op (a guard on its value), so a
    factor that depends on the learning rate would recompile the step whenever the rate changes; in a single op
    per tensor it becomes a graph input, and the compiled kernels fuse the loop anyway."""
    if tracing():
        for tensor in tensors:
            tensor.mul_(scalar)
    else:
        torch._foreach_mul_(tensors, scalar)


def scaled_add_(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float) -> None:
    """``t ← t + alpha · o`` for aligned lists, in place; one multi-tensor op, as :func:`scale_`."""
    if tracing():
        for tensor, other in zip(tensors, others, strict=True):
            tensor.add_(other * alpha)  # add_'s alpha would be specialised too
    else:
        torch._foreach_add_(tensors, others, alpha=alpha)
