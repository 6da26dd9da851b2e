"""Symmetric eigendecomposition of Kronecker factors with the fallback ladder of docs/algorithms.md §6.

Rungs, in order: the factor's own dtype; a float64 retry; float64 with ``ε·I`` added (ε relative to the
factor's scale); finally the previous decomposition is kept with a warning. Eigenvalues are clamped at 0
because factors are positive semi-definite in exact arithmetic and rounding can make small ones negative.

:func:`decompose_many` decomposes all factors due at a step: grouped by size into batched solver calls
(cuSOLVER's through the CUDA extension, else ``torch.linalg.eigh``), with one host check for the whole step
and the ladder only for members that failed. A diagonal side's factor (a vector, Note [diagonal sides] in
:mod:`kldwrm_fast.ops.reference`) needs no solver: its eigenvalues are its entries, clamped at 0, and its
eigenvectors the identity's empty marker.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature.warm import WarmStart, orthogonal_iteration

JITTER = 1e-6

HOST_MAX_N = 128
"""A lone CUDA factor (no other of its size due) up to this size is decomposed on the host CPU. docs/algorithms.md §6
measured, on an H200 machine, 0.03 ms on the host vs 0.16 ms on the GPU at n=16 and 0.97 vs 1.8 ms at n=128;
batches stay on the GPU (64 matrices of n=32: 0.20 ms batched cuSOLVER vs 5.3 ms on the host)."""

BatchedSolver = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
"""``solver(stack) -> (values, vectors, info)`` for a (batch, n, n) stack: ascending eigenvalues (batch, n),
eigenvectors (batch, n, n) with ``vectors[b, :, j]`` the eigenvector of ``values[b, j]`` (as
``torch.linalg.eigh``; any strides, possibly a view of a larger buffer: consumers must not infer a layout from
``_base``), and ``info`` (batch,) int, 0 where the matrix converged, left on the device (the CUDA extension's
``eigh_cuda``). Errors raise ``RuntimeError`` (``torch.linalg.LinAlgError`` is one); the group's members then
go down the ladder one by one."""


def _torch_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh``: every PyTorch-side decomposition goes through here (tests inject failures)."""
    return torch.linalg.eigh(matrix)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_torch_eigh` that also rejects non-finite results (one rung of the ladder)."""
    values, vectors = _torch_eigh(matrix)
    if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
        raise torch.linalg.LinAlgError("eigendecomposition returned non-finite values")
    return values, vectors


def _attempts(matrix: Tensor):
    yield matrix
    wide = matrix.to(torch.float64)
    yield wide
    scale = wide.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)
    eye = torch.eye(wide.shape[-1], dtype=wide.dtype, device=wide.device)
    yield wide + (JITTER * scale)[..., None, None] * eye


def _ladder(matrix: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """``(Q, d)`` from the first rung that succeeds, or None when every rung fails."""
    for attempt in _attempts(matrix):
        if not torch.isfinite(attempt).all():
            break
        try:
            values, vectors = _eigh(attempt)
        except torch.linalg.LinAlgError:
            continue
        return vectors.to(matrix.dtype), values.to(matrix.dtype).clamp_min_(0.0)
    return None


def _fallback(matrix: Tensor, previous: Optional[tuple[Tensor, Tensor]], name: str) -> tuple[Tensor, Tensor]:
    """A copy of the previous decomposition, or the identity when there is none, with a warning. (A copy: the
    previous one may be another key's state, which the caller then writes in place; Q's ``Â`` falls back to the
    tensors of ``Ā``'s decomposition.) A diagonal factor (a vector) fails only by not being finite; its identity is
    the empty marker with eigenvalues 1."""
    diagonal = matrix.dim() == 1
    if previous is None:
        what = f"{name} is not finite" if diagonal else f"eigendecomposition of {name} failed"
        until = "one is" if diagonal else "one succeeds"
        warnings.warn(f"{what} and no earlier one exists; using the identity until {until}", RuntimeWarning,
                      stacklevel=4)  # fmt: skip
        n = matrix.shape[-1]
        eye = matrix.new_empty(0) if diagonal else torch.eye(n, dtype=matrix.dtype, device=matrix.device)
        return eye, matrix.new_ones(n)
    what = f"{name} is not finite" if diagonal else f"eigendecomposition of {name} failed"
    warnings.warn(f"{what}; keeping the previous one", RuntimeWarning, stacklevel=4)
    return previous[0].clone(), previous[1].clone()


def symmetric_eig(
    matrix: Tensor, previous: Optional[tuple[Tensor, Tensor]] = None, name: str = "factor"
) -> tuple[Tensor, Tensor]:
    """Eigenvectors and clamped eigenvalues of a symmetric (..., n, n) matrix.

    Returns:
        ``(Q, d)``: (..., n, n) eigenvectors and (..., n) eigenvalues ≥ 0, both in ``matrix.dtype``.

    When every rung fails, ``previous`` is kept; when there is none (a factor that overflowed on its first
    statistics, say), the identity stands in (``Q = I``, ``d = 1``: an unpreconditioned direction on that
    side) until a later decomposition succeeds. Both with a warning.
    """
    result = _ladder(matrix)
    return result if result is not None else _fallback(matrix, previous, name)


def _eigh_batched(stack: Tensor, solver: Optional[BatchedSolver]) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, vectors, ok)`` of a (batch, n, n) stack without a host sync; ``ok`` (batch,) bool on the device:
    the solver converged, and the stack and its decomposition are finite.

    Raises ``RuntimeError`` when the solver (or ``torch.linalg.eigh``, with ``LinAlgError``) rejects the batch
    as a whole.
    """
    if solver is not None:
        values, vectors, info = solver(stack)
        converged = info == 0
    elif stack.is_cuda and stack.shape[0] == 1 and stack.shape[-1] <= HOST_MAX_N:
        values, vectors = (t.to(stack.device) for t in _torch_eigh(stack.cpu()))
        converged = None
    else:
        values, vectors = _torch_eigh(stack)
        converged = None
    # One summing pass per tensor instead of isfinite's three: a sum is non-finite if any entry is, and
    # orthonormal eigenvectors and eigenvalues of a finite factor cannot overflow it (a factor whose entries
    # sum past the float range is a false alarm, which only costs a ladder run).
    ok = torch.isfinite(values.sum(-1) + vectors.sum((-2, -1)) + stack.sum((-2, -1)))
    return values, vectors, ok if converged is None else ok & converged


def _by_size(indices: list[int], requests: list) -> list[list[int]]:
    """``indices`` grouped by their matrices' size, dtype and device (one batched call each)."""
    groups: dict[tuple, list[int]] = {}
    for index in indices:
        matrix = requests[index][0]
        groups.setdefault((matrix.shape[-1], matrix.dtype, matrix.device), []).append(index)
    return list(groups.values())


def _launch_exact(indices: list[int], requests: list, solver: Optional[BatchedSolver]) -> list[tuple]:
    """Batched solver calls for ``requests[indices]``, grouped by size, dtype and device: ``(indices, values,
    vectors, ok)`` per group the solver accepted (a rejected group's members are left to the ladder)."""
    launched = []
    for members in _by_size(indices, requests):
        stack = torch.stack([requests[i][0] for i in members])
        try:
            values, vectors, ok = _eigh_batched(stack, solver)
        except RuntimeError:  # LinAlgError from torch, any error of the extension's solver: ladder per member
            continue
        launched.append((members, values.clamp_min_(0.0), vectors, ok))
    return launched


def _warm_startable(request: tuple) -> bool:
    matrix, previous, _ = request
    return matrix.dim() == 2 and previous is not None and previous[0].shape == matrix.shape


def _launch_warm(indices: list[int], requests: list, warm: WarmStart) -> list[tuple]:
    """Orthogonal iteration from each member's previous basis (:mod:`kldwrm_fast.curvature.warm`), grouped as
    :func:`_launch_exact`; ``ok`` also asks for a residual within ``warm.tol``."""
    launched = []
    for members in _by_size(indices, requests):
        stack = torch.stack([requests[i][0] for i in members])
        basis = torch.stack([requests[i][1][0].to(stack.dtype) for i in members])
        try:
            values, vectors, residual = orthogonal_iteration(stack, basis, warm.iters)
        except RuntimeError:  # a QR that failed: the exact path
            continue
        finite = torch.isfinite(values.sum(-1) + vectors.sum((-2, -1)) + stack.sum((-2, -1)))
        launched.append((members, values.clamp_min_(0.0), vectors, finite & (residual <= warm.tol)))
    return launched


def _accept(launched: list[tuple], results: list) -> None:
    """One host transfer of every launched member's flag; accepted members' ``(Q, d)`` go into ``results``."""
    if not launched:
        return
    flags = torch.cat([ok.to(launched[0][3].device) for *_, ok in launched]).tolist()
    position = 0
    for indices, values, vectors, _ in launched:
        for j, index in enumerate(indices):
            if flags[position]:
                results[index] = (vectors[j], values[j])
            position += 1


def decompose_many(
    requests: list[tuple[Tensor, Optional[tuple[Tensor, Tensor]], str]],
    solver: Optional[BatchedSolver] = None,
    failed: Optional[list[int]] = None,
    warm: Optional[WarmStart] = None,
    warmed: Optional[list[int]] = None,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`symmetric_eig` for many factors, grouped by size, dtype and device into batched calls.

    All groups are launched first; one host transfer of their per-member success flags follows (the step's
    only sync for eigendecompositions); members that failed, or whose group the solver rejected, go down the
    fallback ladder on their own. With ``warm``, a dense factor with a previous decomposition of its shape is
    first updated from it (:func:`~kldwrm_fast.curvature.warm.orthogonal_iteration`, launched with the exact
    groups); one whose update fails or whose residual exceeds ``warm.tol`` is then decomposed exactly (batched
    again, one more host transfer, only when some warm update was refused).

    Args:
        requests: ``(matrix, previous, name)`` per factor, as for :func:`symmetric_eig`.
        solver: the batched solver (:data:`BatchedSolver`; the CUDA backend passes cuSOLVER's); None:
            ``torch.linalg.eigh``, on the host CPU for lone CUDA factors up to :data:`HOST_MAX_N`.
        failed: if given, the indices of requests for which every rung failed are appended to it.
        warm: the warm start's settings, or None for exact decompositions only.
        warmed: if given, the indices of requests whose warm update was accepted are appended to it.

    Returns:
        ``(Q, d)`` per request, in order (members of a batched group are views of one tensor), eigenvalues ascending.
    """
    launched, dense, starts = [], [], []
    for index, request in enumerate(requests):
        matrix = request[0]
        if matrix.dim() == 1:  # its check joins the one host transfer below
            ok = torch.isfinite(matrix).all().reshape(1)
            launched.append(([index], matrix.clamp_min(0.0).unsqueeze(0), matrix.new_empty(1, 0), ok))
        elif warm is not None and _warm_startable(request):
            starts.append(index)
        else:
            dense.append(index)
    launched += _launch_exact(dense, requests, solver) + (_launch_warm(starts, requests, warm) if starts else [])
    results: list = [None] * len(requests)
    _accept(launched, results)
    refused = [index for index in starts if results[index] is None]
    if warmed is not None:
        warmed += [index for index in starts if results[index] is not None]
    if refused:
        _accept(_launch_exact(refused, requests, solver), results)
    for index, result in enumerate(results):
        if result is not None:
            continue
        diagonal = requests[index][0].dim() == 1  # (no rung retries a diagonal: it failed by not being finite)
        results[index] = None if diagonal else _ladder(requests[index][0])
        if results[index] is None:
            results[index] = _fallback(*requests[index])
            if failed is not None:
                failed.append(index)
    return results
