"""The eigendecomposition fallback ladder (docs/algorithms.md §6), each rung reached by an injected failure."""

import helpers.matrices as matrices
import pytest
import torch

from kldwrm_fast.curvature import eigen


def spd(n=4, dtype=torch.float32):
    return matrices.spd(n, dtype)


def test_clean_decomposition_reconstructs_and_clamps():
    matrix = spd(dtype=torch.float64)
    matrix -= (torch.linalg.eigvalsh(matrix)[0] + 1e-3) * torch.eye(4, dtype=torch.float64)  # λ_min = −1e-3
    q, d = eigen.symmetric_eig(matrix)
    assert d.min() == 0.0
    true = torch.linalg.eigvalsh(matrix)
    torch.testing.assert_close(d, true.clamp_min(0.0))
    torch.testing.assert_close(q @ torch.diag(true) @ q.T, matrix)


def test_float64_retry(monkeypatch):
    real = eigen._eigh
    seen = []

    def failing_in_float32(matrix):
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("injected")
        return real(matrix)

    monkeypatch.setattr(eigen, "_eigh", failing_in_float32)
    matrix = spd()
    q, d = eigen.symmetric_eig(matrix)
    assert seen == [torch.float32, torch.float64]
    assert q.dtype == d.dtype == torch.float32
    torch.testing.assert_close(q @ torch.diag(d) @ q.T, matrix, rtol=1e-4, atol=1e-4)


def test_jitter_rung(monkeypatch):
    real = eigen._eigh
    matrix = spd(dtype=torch.float64)

    def failing_without_jitter(candidate):
        if torch.equal(candidate, matrix):
            raise torch.linalg.LinAlgError("injected")
        return real(candidate)

    monkeypatch.setattr(eigen, "_eigh", failing_without_jitter)
    _, d = eigen.symmetric_eig(matrix)
    shift = eigen.JITTER * max(1.0, matrix.diagonal().abs().mean().item())
    torch.testing.assert_close(d, torch.linalg.eigvalsh(matrix) + shift)


def test_previous_decomposition_is_kept_with_a_warning(monkeypatch):
    def always_failing(candidate):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(eigen, "_eigh", always_failing)
    previous = (torch.eye(3), torch.ones(3))
    with pytest.warns(RuntimeWarning, match="keeping the previous one"):
        result = eigen.symmetric_eig(spd(3), previous, "input factor of fc")
    # a copy: the caller writes decompositions into the state in place, and Q's reweighted factor falls back to
    # the tensors of its average's decomposition, which are then overwritten
    assert all(torch.equal(r, p) and r.data_ptr() != p.data_ptr() for r, p in zip(result, previous))
    with pytest.warns(RuntimeWarning, match="no earlier one exists; using the identity"):
        vectors, values = eigen.symmetric_eig(spd(3))
    assert torch.equal(vectors, torch.eye(3)) and torch.equal(values, torch.ones(3))


def test_non_finite_factor_keeps_the_previous_decomposition():
    bad = spd(3)
    bad[0, 1] = float("nan")
    previous = (torch.eye(3), torch.ones(3))
    with pytest.warns(RuntimeWarning):
        kept = eigen.symmetric_eig(bad, previous)
    assert all(torch.equal(k, p) for k, p in zip(kept, previous))


def test_decompose_many_groups_equal_sizes_into_one_batched_call(monkeypatch):
    real = eigen._eigh_batched
    shapes = []

    def recording(stack, solver):
        shapes.append(tuple(stack.shape))
        return real(stack, solver)

    monkeypatch.setattr(eigen, "_eigh_batched", recording)
    matrices = [spd(4), spd(4), spd(3), spd(4), spd(4, torch.float64)]
    results = eigen.decompose_many([(m, None, f"m{i}") for i, m in enumerate(matrices)])
    assert sorted(shapes) == sorted([(3, 4, 4), (1, 3, 3), (1, 4, 4)])
    for matrix, (q, d) in zip(matrices, results):
        assert q.dtype == d.dtype == matrix.dtype and (d >= 0).all()
        torch.testing.assert_close(q @ torch.diag(d) @ q.T, matrix, rtol=1e-4, atol=1e-4)


def test_solver_flags_send_only_unconverged_members_down_the_ladder(monkeypatch):
    """A batched solver (cuSOLVER's on CUDA) reports per-matrix info; only members with info != 0 are redone."""
    calls = []

    def solver(stack):
        calls.append(tuple(stack.shape))
        values, vectors = torch.linalg.eigh(stack)
        info = torch.zeros(stack.shape[0], dtype=torch.int32)
        info[1] = 7  # the second member "did not converge"; its garbage output must not be used
        vectors[1] = float("nan")
        return values, vectors, info

    ladder = []
    real_ladder = eigen._ladder

    def recording_ladder(matrix):
        ladder.append(matrix)
        return real_ladder(matrix)

    monkeypatch.setattr(eigen, "_ladder", recording_ladder)
    matrices = [spd(5), spd(5), spd(5)]
    results = eigen.decompose_many([(m, None, f"m{i}") for i, m in enumerate(matrices)], solver=solver)
    assert calls == [(3, 5, 5)] and len(ladder) == 1 and ladder[0] is matrices[1]
    for matrix, (q, d) in zip(matrices, results):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q @ torch.diag(d) @ q.T, matrix, rtol=1e-4, atol=1e-4)


def test_a_failing_member_sends_only_its_group_down_the_ladder():
    good = [spd(3), spd(3)]
    bad = spd(3)
    bad[1, 2] = float("nan")
    previous = (torch.eye(3), torch.ones(3))
    requests = [(good[0], None, "a"), (bad, previous, "b"), (good[1], None, "c"), (spd(5), None, "d")]
    with pytest.warns(RuntimeWarning, match="eigendecomposition of b failed"):
        results = eigen.decompose_many(requests)
    assert all(torch.equal(r, p) for r, p in zip(results[1], previous))
    for matrix, (q, d) in zip(good, (results[0], results[2])):
        torch.testing.assert_close(q @ torch.diag(d) @ q.T, matrix, rtol=1e-4, atol=1e-4)


def test_a_solver_error_sends_its_group_down_the_ladder():
    """The CUDA extension raises RuntimeError (not LinAlgError) for argument or launch errors: not fatal."""

    def solver(stack):
        if stack.shape[-1] == 4:
            raise RuntimeError("eigh_cuda: cusolverDnXsyevBatched failed with cuSOLVER status 7")
        values, vectors = torch.linalg.eigh(stack)
        return values, vectors, torch.zeros(stack.shape[0], dtype=torch.int32)

    matrices = [spd(4), spd(3), spd(4)]
    results = eigen.decompose_many([(m, None, f"m{i}") for i, m in enumerate(matrices)], solver=solver)
    for matrix, (q, d) in zip(matrices, results):
        torch.testing.assert_close(q @ torch.diag(d) @ q.T, matrix, rtol=1e-4, atol=1e-4)
