"""``eigensolver="warm"`` in the optimizers (docs/algorithms.md §6.5): the step with warm bases equals the exact one to
what the residual allows, the exact path takes over on the refreshes it names (the first, a refused update, every
``full_every``-th), and a resumed run continues bit for bit."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.trajectories import model_and_batches, trajectory

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


def extra_for(cls, **options):
    return dict(options, **(dict(n_inner=2) if cls is QEKLDWRM else {}))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_converged_warm_bases_give_the_exact_trajectory(cls):
    """With ``warm_tol = 1e-11`` an accepted basis decomposes a factor within 1e-11 of the true one (relative
    Frobenius); the step's error is then at most ``‖V‖ · 1e-11 · 2‖A‖‖Γ‖ / δ²`` per block (docs/algorithms.md §6.5),
    below 1e-6 of the step here, and the trajectories agree far closer than that."""
    model, batches = model_and_batches(dtype=torch.float64)
    exact, _ = trajectory(cls, "torch", copy.deepcopy(model), batches, **extra_for(cls))
    options = extra_for(cls, eigensolver="warm", warm_iters=60, warm_tol=1e-11, full_every=None)
    warm, opt = trajectory(cls, "torch", model, batches, **options)
    assert opt.estimator.decompositions["warm"] > 0
    for a, b in zip(warm, exact):
        assert (a - b).norm() <= 1e-8 * b.norm()


def run(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_full_every_forces_exact_refreshes_and_the_rest_are_warm():
    model, batches = model_and_batches(dtype=torch.float64)
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1, eigensolver="warm", warm_tol=1.0, full_every=3)
    run(opt, model, batches * 2)  # 14 refreshes: 0, 3, 6, 9, 12 exact
    n_dense = 2 * len(opt.curvature.blocks)
    assert opt.estimator.decompositions == {"exact": 5 * n_dense, "warm": 9 * n_dense, "low_rank": 0}


def test_a_factor_whose_spectrum_jumps_is_decomposed_exactly():
    model, batches = model_and_batches(dtype=torch.float64)
    opt = KFAC(model, lr=0.05, stat_freq=1, inv_freq=1, rho=0.5, eigensolver="warm", warm_iters=0, warm_tol=0.05,
               full_every=None)  # fmt: skip
    run(opt, model, batches[:3])
    before = dict(opt.estimator.decompositions)
    x, y = batches[3]
    scale = torch.linspace(0.1, 40.0, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    run(opt, model, [(x * scale, y)])  # the first layer's input factor changes its eigenbasis
    assert opt.estimator.decompositions["exact"] > before["exact"]
    block = opt.curvature.blocks[0]
    state = opt.block_state(block)
    torch.testing.assert_close(state["dA"], torch.linalg.eigvalsh(state["A_ea"]).clamp_min(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_warm_run_resumes_bit_identically(cls):
    model, batches = model_and_batches()
    options = extra_for(cls, eigensolver="warm", warm_tol=1.0, full_every=2)
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2, **options)
    for k, (x, y) in enumerate(batches):
        if k == 3:
            twin_model = copy.deepcopy(model)
            twin = cls(twin_model, lr=0.05, stat_freq=1, inv_freq=2, **extra_for(cls))  # options from the checkpoint
            twin.load_state_dict(copy.deepcopy(opt.state_dict()))
            assert twin.param_groups[0]["eigensolver"] == "warm" and twin.param_groups[0]["full_every"] == 2
        for net, optimizer in ((model, opt), (twin_model, twin)) if k >= 3 else ((model, opt),):
            run(optimizer, net, [(x, y)])
    assert opt.estimator.decompositions["warm"] > 0 and twin.estimator.decompositions["warm"] > 0
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("eigensolver", "fast", r"Invalid eigensolver: 'fast'; expected one of \('exact', 'warm'\)"),
        ("warm_iters", -1, "Invalid warm_iters: -1; expected an integer >= 0"),
        ("warm_tol", float("nan"), "Invalid warm_tol: nan; expected 0 <= warm_tol < inf"),
        ("full_every", 0, "Invalid full_every: 0; expected an integer >= 1 or None"),
    ],
)
def test_bad_warm_options_are_refused_in_one_line(option, value, message):
    model, _ = model_and_batches()
    with pytest.raises(ValueError, match=message):
        KFAC(model, **{option: value})
