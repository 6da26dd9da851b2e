"""Warm-started eigenbases (kldwrm_fast/curvature/warm.py, docs/algorithms.md §6.5) against torch.linalg.eigh and the
bounds the documentation states: the residual is the distance to the matrix the step decomposes, and Weyl's
inequality bounds the eigenvalues by it."""

import pytest
import torch
from helpers.matrices import spd

from kldwrm_fast.curvature import eigen
from kldwrm_fast.curvature.warm import WarmStart, orthogonal_iteration


def drifting(n, steps, rate, seed):
    """Factors ``X_{t+1} = (1 − rate) X_t + rate S_t`` with fresh SPD ``S_t``: an exponential average's drift."""
    gen = torch.Generator().manual_seed(seed)
    x = spd(n, generator=gen)
    out = [x]
    for _ in range(steps):
        x = (1 - rate) * x + rate * spd(n, generator=gen)
        out.append(0.5 * (x + x.mT))
    return out


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_the_residual_is_the_distance_to_the_decomposed_matrix_and_bounds_the_eigenvalues(iters):
    factors = drifting(12, 6, 0.1, seed=0)
    basis = torch.linalg.eigh(factors[0])[1]
    for x in factors[1:]:
        values, vectors, residual = orthogonal_iteration(x[None], basis[None], iters)
        values, vectors, residual = values[0], vectors[0], residual[0]
        torch.testing.assert_close(vectors.mT @ vectors, torch.eye(12, dtype=x.dtype), rtol=0, atol=1e-12)
        distance = torch.linalg.matrix_norm(x - vectors @ torch.diag(values) @ vectors.mT)
        torch.testing.assert_close(distance, residual * torch.linalg.matrix_norm(x), rtol=1e-10, atol=1e-14)
        weyl = (values.sort().values - torch.linalg.eigvalsh(x)).abs().max()
        assert weyl <= residual * torch.linalg.matrix_norm(x) + 1e-12
        basis = vectors


def test_more_iterations_reduce_the_residual_of_a_drifted_factor():
    factors = drifting(16, 1, 0.2, seed=1)
    basis = torch.linalg.eigh(factors[0])[1][None]
    residuals = [orthogonal_iteration(factors[1][None], basis, iters)[2].item() for iters in (0, 1, 4, 16)]
    assert residuals == sorted(residuals, reverse=True) and residuals[-1] < 0.1 * residuals[0]


def test_many_iterations_give_the_eigenspaces_of_eigh():
    gen = torch.Generator().manual_seed(2)
    rotation = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=gen)).Q
    spectrum = 2.0 ** -torch.arange(8, dtype=torch.float64)  # gaps of 2: 1 − 2⁻ᵏ per iteration
    x = rotation @ torch.diag(spectrum) @ rotation.mT
    start = torch.linalg.qr(rotation + 0.3 * torch.randn(8, 8, dtype=torch.float64, generator=gen)).Q
    values, vectors, residual = (t[0] for t in orthogonal_iteration(x[None], start[None], 80))
    order = values.argsort()
    expected_values, expected_vectors = torch.linalg.eigh(x)
    torch.testing.assert_close(values[order], expected_values, rtol=1e-12, atol=1e-14)
    for j in range(8):  # projectors, not vectors: signs are arbitrary
        ours, theirs = vectors[:, order[j]], expected_vectors[:, j]
        torch.testing.assert_close(torch.outer(ours, ours), torch.outer(theirs, theirs), rtol=0, atol=1e-10)
    assert residual < 1e-12


def test_decompose_many_keeps_a_warm_update_within_tolerance_and_decomposes_a_jumped_factor_exactly():
    factors = drifting(10, 1, 0.05, seed=3)
    previous = torch.linalg.eigh(factors[0])
    settled = (previous.eigenvectors, previous.eigenvalues)
    jumped = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)) * 50  # a spectrum the old basis misses
    requests = [(factors[1], settled, "drifted"), (jumped, settled, "jumped"), (factors[1], None, "new")]
    warmed: list[int] = []
    results = eigen.decompose_many(requests, warm=WarmStart(1, 0.05), warmed=warmed)
    assert warmed == [0]
    for (vectors, values), (matrix, _, _) in zip(results, requests):
        distance = torch.linalg.matrix_norm(matrix - vectors @ torch.diag(values) @ vectors.mT)
        assert distance <= 0.05 * torch.linalg.matrix_norm(matrix)
    exact = torch.linalg.eigh(jumped)
    torch.testing.assert_close(results[1][1], exact.eigenvalues)  # refused: the exact path, ascending
    torch.testing.assert_close(results[2][1], torch.linalg.eigh(factors[1]).eigenvalues)


def test_a_warm_update_with_non_finite_results_takes_the_exact_path():
    factors = drifting(6, 1, 0.05, seed=4)
    previous = torch.linalg.eigh(factors[0])
    poisoned = previous.eigenvectors.clone()
    poisoned[0, 0] = float("nan")
    warmed: list[int] = []
    (vectors, values), = eigen.decompose_many(
        [(factors[1], (poisoned, previous.eigenvalues), "f")], warm=WarmStart(0, 1.0), warmed=warmed
    )
    assert warmed == [] and torch.isfinite(vectors).all()
    torch.testing.assert_close(values, torch.linalg.eigh(factors[1]).eigenvalues)
