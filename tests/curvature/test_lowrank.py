"""Low-rank factor sides (kldwrm_fast/curvature/lowrank.py, docs/algorithms.md §6.7) against torch.linalg.eigh and an
explicit Kronecker solve: the range finder keeps the top eigenpairs and the mean of the rest, and the O(n·r)
preconditioning is the exact inverse of the truncated factors' damped Kronecker product."""

import pytest
import torch

from kldwrm_fast.curvature import lowrank


def orthonormal(n, r, gen):
    return torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64)).Q


def truncated(u, d, t):
    """``U diag(d) Uᵀ + t (I − U Uᵀ)`` (n, n)."""
    eye = torch.eye(u.shape[0], dtype=u.dtype)
    return u @ torch.diag(d) @ u.mT + t * (eye - u @ u.mT)


def projector(u):
    return u @ u.mT


def decaying(n, gen, rate=0.6):
    """An SPD factor with eigenvalues ``rate^j``: the spectrum of an averaged K-FAC factor decays fast."""
    q = orthonormal(n, n, gen)
    return q @ torch.diag(rate ** torch.arange(n, dtype=torch.float64)) @ q.mT


def test_a_factor_of_rank_r_is_recovered_exactly_and_a_flat_tail_costs_the_gap_ratio_squared():
    gen = torch.Generator().manual_seed(0)
    n, r = 40, 5
    u, d = orthonormal(n, r, gen), torch.tensor([2.0, 3.0, 5.0, 7.0, 11.0], dtype=torch.float64)
    errors = []
    for tail in (0.0, 0.02, 0.002):
        vectors, values, found = lowrank.decompose_many([(truncated(u, d, tail), None, "factor")], r, [0])[0]
        errors.append(((values - d).abs().max(), (projector(vectors) - projector(u)).abs().max()))
        torch.testing.assert_close(found, torch.tensor(tail, dtype=torch.float64), rtol=1e-3, atol=1e-14)
    assert errors[0][0] < 1e-12 and errors[0][1] < 1e-12
    # one power iteration: the basis error falls with (t / d_min)², the Ritz values' with its fourth power
    assert errors[1][1] / errors[2][1] > 50 and errors[1][0] / errors[2][0] > 5000


@pytest.mark.parametrize("warm", [False, True])
def test_the_kept_pairs_are_eighs_top_ones_and_the_tail_is_the_mean_of_the_rest(warm):
    gen = torch.Generator().manual_seed(1)
    n, r = 120, 12
    x = decaying(n, gen)
    exact_values, exact_vectors = torch.linalg.eigh(x)
    previous = None
    if warm:  # the last basis of a nearby factor
        nearby = x + 1e-3 * decaying(n, gen)
        values, vectors = torch.linalg.eigh(nearby)
        previous = (vectors[:, -r:], values[-r:], values[:-r].mean())
    vectors, values, tail = lowrank.decompose_many([(x, previous, "factor")], r, [3])[0]
    torch.testing.assert_close(values, exact_values[-r:], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(projector(vectors), projector(exact_vectors[:, -r:]), rtol=0, atol=1e-6)
    torch.testing.assert_close(tail, exact_values[:-r].mean(), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(vectors.mT @ vectors, torch.eye(r, dtype=x.dtype), rtol=0, atol=1e-12)


def test_the_random_columns_follow_the_seed_not_the_batch():
    gen = torch.Generator().manual_seed(2)
    x, y = decaying(30, gen, rate=0.9), decaying(30, gen, rate=0.9)
    seed = lowrank.seed_of(7, 1, "A")
    alone = lowrank.decompose_many([(x, None, "input factor of fc1")], 4, [seed])[0]
    batched = lowrank.decompose_many([(y, None, "other"), (x, None, "input factor of fc1")], 4, [0, seed])[1]
    for a, b in zip(alone, batched):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)  # batched GEMMs round differently
    assert len({lowrank.seed_of(*where) for where in [(7, 1, "A"), (8, 1, "A"), (7, 0, "A"), (7, 1, "G")]}) == 4
    later = lowrank.decompose_many([(x, None, "input factor of fc1")], 4, [lowrank.seed_of(8, 1, "A")])[0]
    assert not torch.equal(alone[0], later[0])  # a slow spectrum (0.9^j): the draw shows in the basis


def test_a_factor_that_is_not_finite_keeps_its_previous_decomposition_or_gets_the_identity():
    x = torch.full((20, 20), float("nan"), dtype=torch.float64)
    failed = []
    with pytest.warns(RuntimeWarning, match="no earlier one exists"):
        vectors, values, tail = lowrank.decompose_many([(x, None, "input factor of fc")], 3, [0], failed)[0]
    assert failed == [0]
    torch.testing.assert_close(vectors, torch.eye(20, 3, dtype=torch.float64))
    assert values.tolist() == [1.0, 1.0, 1.0] and tail.item() == 1.0
    previous = (vectors * 2, values * 3, tail * 4)
    with pytest.warns(RuntimeWarning, match="keeping the previous one"):
        kept = lowrank.decompose_many([(x, previous, "input factor of fc")], 3, [0])[0]
    for a, b in zip(kept, previous):
        torch.testing.assert_close(a, b)


SIDES = ["low", "dense", "diagonal"]


def side(kind, n, r, gen):
    """``(state entries, the explicit factor)`` of one side of a block."""
    if kind == "low":
        u, d, t = orthonormal(n, r, gen), torch.rand(r, generator=gen, dtype=torch.float64) + 0.5, torch.tensor(0.2)
        return {"Q": u, "d": d, "t": t.double()}, truncated(u, d, t.double())
    d = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    if kind == "diagonal":
        return {"Q": d.new_empty(0), "d": d}, torch.diag(d)
    q = orthonormal(n, n, gen)
    return {"Q": q, "d": d}, q @ torch.diag(d) @ q.mT


@pytest.mark.parametrize("kind_g", SIDES)
@pytest.mark.parametrize("kind_a", SIDES)
def test_preconditioning_is_the_inverse_of_the_truncated_damped_kronecker_product(kind_g, kind_a):
    gen = torch.Generator().manual_seed(3)
    n_out, n_in, damping = 9, 11, 0.07
    entries_g, factor_g = side(kind_g, n_out, 3, gen)
    entries_a, factor_a = side(kind_a, n_in, 4, gen)
    state = {"QG": entries_g["Q"], "dG": entries_g["d"], "QA": entries_a["Q"], "dA": entries_a["d"]}
    for key, entries in (("tG", entries_g), ("tA", entries_a)):
        if "t" in entries:
            state[key] = entries["t"]
    v = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    (got,) = lowrank.precondition([state], [v], damping)
    # row-major vec: vec(Γ V A) = (Γ ⊗ A) vec(V) for symmetric A
    big = torch.kron(factor_g, factor_a) + damping * torch.eye(n_out * n_in, dtype=torch.float64)
    expected = torch.linalg.solve(big, v.reshape(-1)).reshape(n_out, n_in)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
