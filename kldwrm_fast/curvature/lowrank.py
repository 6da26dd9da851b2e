"""Low-rank factor sides (docs/algorithms.md §6.7): a dense factor side at least ``rank`` wide keeps its top ``r``
eigenpairs and the mean of the rest of its spectrum, so that K-FAC's and SO's preconditioning costs O(n·r) per side
instead of O(n²).

A side is ``X ≈ X_r = U diag(d) Uᵀ + t (I − U Uᵀ)`` with ``U`` (n, r) orthonormal, ``d`` (r,) ascending and the tail
``t = (tr X − Σ d) / (n − r)`` (0 when r = n). The pair ``(U, d)`` is stored where a dense side keeps its
eigendecomposition (``QG``/``dG``, ``QA``/``dA``) and the tail under ``tG``/``tA`` (0-dim); a side with a tail key is
low-rank. ``(U, d)`` come from a randomized range finder (Halko, Martinsson and Tropp 2011, Alg. 4.4 and 5.3; the
paper's author applies it to K-FAC in "Randomized K-FACs", arXiv 2206.15397) started from the previous ``U`` when
there is one, with :data:`OVERSAMPLE` Gaussian columns and :data:`POWER_ITERATIONS` power iterations, then
Rayleigh–Ritz: the eigendecomposition of the small ``Qᵀ X Q``. The Gaussian columns are drawn from a generator seeded
by the step and the factor's block and side, so a resumed run and every rank of a data-parallel job draw the same ones.
"""

from __future__ import annotations

import warnings
import zlib
from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature.state import INPUT, OUTPUT
from kldwrm_fast.ops import reference

OVERSAMPLE = 10
"""Extra columns of the range finder beyond ``r`` (Halko et al. §4.2: 5–10 suffice for a fast-decaying spectrum)."""
POWER_ITERATIONS = 1
"""Power iterations ``Y ← X qr(Y)`` of the range finder (Halko et al. Alg. 4.4): each sharpens the captured subspace
by the gap ratio ``λ_{r+p}/λ_r`` at the cost of one GEMM and one thin QR."""


def tail_key(side: str) -> str:
    """The key of a low-rank side's tail eigenvalue: ``"tA"`` or ``"tG"``."""
    return f"t{side}"


def present(states: list[dict]) -> bool:
    """Whether any of the block states holds a low-rank side (a tail under :func:`tail_key`)."""
    return any(tail_key(side) in state for state in states for side in (INPUT, OUTPUT))


def applies(matrix: Tensor, rank: Optional[int]) -> bool:
    """Whether a factor to decompose is kept as a low-rank side: dense and at least ``rank`` wide."""
    return rank is not None and matrix.dim() == 2 and matrix.shape[-1] >= rank


def _sketch(matrix: Tensor, previous: Optional[tuple], rank: int, seed: int) -> Tensor:
    """The range finder's start (n, l), ``l = min(rank + OVERSAMPLE, n)``: the previous basis (largest first) where
    it has ``rank`` columns, completed with Gaussian columns drawn from ``seed``."""
    n = matrix.shape[-1]
    width = min(rank + OVERSAMPLE, n)
    start = []
    if previous is not None and previous[0].shape == (n, rank):
        start.append(previous[0].flip(-1).to(matrix.dtype))
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    fresh = width - sum(s.shape[-1] for s in start)
    start.append(torch.randn(n, fresh, generator=generator, dtype=matrix.dtype, device=matrix.device))
    return torch.cat(start, -1)


def range_finder(stack: Tensor, start: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, vectors, tail)`` of symmetric PSD (batch, n, n) factors from (batch, n, l) starting columns.

    Returns:
        ``values`` (batch, rank): the top ``rank`` Ritz values, ascending, not clamped; ``vectors`` (batch, n, rank):
        their orthonormal Ritz vectors; ``tail`` (batch,): ``(tr X − Σ values) / (n − rank)``, 0 where rank = n.
    """
    n = stack.shape[-1]
    basis = torch.linalg.qr(torch.matmul(stack, start)).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(torch.matmul(stack, basis)).Q
    small = basis.transpose(-1, -2) @ stack @ basis
    values, rotation = torch.linalg.eigh(0.5 * (small + small.transpose(-1, -2)))
    values, vectors = values[..., -rank:], basis @ rotation[..., -rank:]
    rest = stack.diagonal(dim1=-2, dim2=-1).sum(-1) - values.sum(-1)
    tail = rest / (n - rank) if n > rank else torch.zeros_like(rest)
    return values, vectors, tail


def seed_of(step: int, block: int, key: str) -> int:
    """The Gaussian columns' seed: the step, the block's position among the model's blocks and the factor's key
    (``zlib.crc32``: the same in every process; not the layer's name, which a DistributedDataParallel wrapper
    prefixes)."""
    return (step * 0x9E3779B1 + block * 0x85EBCA77 + zlib.crc32(key.encode())) % (2**63)


def decompose_many(
    requests: list, rank: int, seeds: list[int], failed: Optional[list[int]] = None
) -> list[tuple]:
    """``(U, d, t)`` per ``(matrix, previous, name)`` request (as :func:`kldwrm_fast.curvature.eigen.decompose_many`),
    batched per size, dtype and device, with one host check; ``d`` and ``t`` clamped at 0; ``seeds``: each request's
    Gaussian columns' seed (:func:`seed_of`).

    A member whose result is not finite (its factor overflowed, or the small eigendecomposition failed) keeps its
    previous ``(U, d, t)`` (``previous`` then has a third entry), or with none the identity's: the first ``rank``
    columns of ``I`` with ``d = 1``, ``t = 1``; both with a warning, its index appended to ``failed``."""
    groups: dict[tuple, list[int]] = {}
    for index, (matrix, _, _) in enumerate(requests):
        groups.setdefault((matrix.shape[-1], matrix.dtype, matrix.device), []).append(index)
    launched = []
    for members in groups.values():
        stack = torch.stack([requests[i][0] for i in members])
        start = torch.stack([_sketch(*requests[i][:2], rank, seeds[i]) for i in members])
        try:
            values, vectors, tail = range_finder(stack, start, rank)
        except RuntimeError:  # a QR or eigh that failed on the whole group: every member falls back
            continue
        ok = torch.isfinite(values.sum(-1) + vectors.sum((-2, -1)) + tail + stack.sum((-2, -1)))
        launched.append((members, values.clamp_min(0.0), vectors, tail.clamp_min(0.0), ok))
    results: list = [None] * len(requests)
    if launched:
        flags = torch.cat([entry[-1] for entry in launched]).tolist()
        position = 0
        for members, values, vectors, tail, _ in launched:
            for j, index in enumerate(members):
                if flags[position]:
                    results[index] = (vectors[j], values[j], tail[j])
                position += 1
    for index, result in enumerate(results):
        if result is None:
            results[index] = _fallback(*requests[index], rank)
            if failed is not None:
                failed.append(index)
    return results


def _fallback(matrix: Tensor, previous: Optional[tuple], name: str, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    if previous is not None and len(previous) == 3 and previous[0].shape == (matrix.shape[-1], rank):
        warnings.warn(f"low-rank decomposition of {name} failed; keeping the previous one", RuntimeWarning,
                      stacklevel=4)  # fmt: skip
        return tuple(t.clone() for t in previous)
    warnings.warn(f"low-rank decomposition of {name} failed and no earlier one exists; using the identity until one "
                  "succeeds", RuntimeWarning, stacklevel=4)  # fmt: skip
    eye = torch.eye(matrix.shape[-1], rank, dtype=matrix.dtype, device=matrix.device)
    return eye, matrix.new_ones(rank), matrix.new_ones(())


def precondition(states: list[dict], vs: list[Tensor], damping: float) -> list[Tensor]:
    """``P(V)`` for blocks of which at least one side may be low-rank (the others dense or diagonal): the exact
    inverse of ``A_r ⊗ Γ_r + δ I`` applied with four GEMMs of width ``r`` per block, about
    ``4 n_out n_in (r_Γ + r_A)`` flops against the dense form's ``4 n_out n_in (n_out + n_in)``
    (docs/algorithms.md §6.7)."""
    return [_precondition_block(state, v, damping) for state, v in zip(states, vs, strict=True)]


def _precondition_block(state: dict, v: Tensor, damping: float) -> Tensor:
    q_g, d_g, t_g = state["QG"], state["dG"], state.get(tail_key(OUTPUT))
    q_a, d_a, t_a = state["QA"], state["dA"], state.get(tail_key(INPUT))
    if t_g is None and t_a is None:
        return reference.precondition(q_g, d_g, q_a, d_a, v, damping)
    diagonal_g, diagonal_a = reference.is_diagonal(q_g, v), reference.is_diagonal(q_a, v)

    def from_left(x: Tensor) -> Tensor:  # U_Γ X
        return x if diagonal_g else q_g @ x

    def to_right(x: Tensor) -> Tensor:  # X U_Aᵀ
        return x if diagonal_a else x @ q_a.transpose(-1, -2)

    # W = U_Γᵀ V is needed for the input side's tail, Z = V U_A for the output side's; M = U_Γᵀ V U_A from either
    w = (v if diagonal_g else q_g.transpose(-1, -2) @ v) if t_a is not None else None
    z = (v if diagonal_a else v @ q_a) if t_g is not None else None
    m = (w if diagonal_a else w @ q_a) if w is not None else (z if diagonal_g else q_g.transpose(-1, -2) @ z)
    core = m / (reference.eigenvalue_products(d_g, d_a) + damping)
    if t_g is None:  # U_Γ [core U_Aᵀ + (W − M U_Aᵀ) / (d_Γ t_A + δ)]
        by_tail_a = 1.0 / (d_g.unsqueeze(-1) * t_a + damping)
        return from_left(to_right(core - by_tail_a * m) + by_tail_a * w)
    by_tail_g = 1.0 / (t_g * d_a + damping)
    if t_a is None:  # [U_Γ core + (Z − U_Γ M) / (t_Γ d_A + δ)] U_Aᵀ
        return to_right(from_left(core - m * by_tail_g) + z * by_tail_g)
    # both sides' tails: the four terms of §6.7, the last (both complements) folded into the first two and V / c
    by_tail_a = 1.0 / (d_g.unsqueeze(-1) * t_a + damping)
    by_both = 1.0 / (t_g * t_a + damping)
    first = from_left(to_right(core - (by_tail_a - by_both) * m) + (by_tail_a - by_both) * w)
    second = to_right((z - from_left(m)) * by_tail_g - z * by_both)
    return first + second + by_both * v
