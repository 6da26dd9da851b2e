"""QKLDWRM (docs/algorithms.md §3 "QKLDWRM"): the recursive step is the minimiser of its wake objective (28), with a
varying λ that of (100) (Props. 4.2, A.1), in both ``curvature_sum`` modes; ``curvature_sum="exact"`` against
dense solves of the two-term Kronecker sum of eq. (81) (:mod:`helpers.exact_sum_oracle`); the step cap
(``max_step_rms``, "Step cap") that lets Q train past its default lr."""

import copy
import os
import warnings

import helpers.distributed_worker as worker
import pytest
import torch
import torch.nn.functional as F
from helpers.exact_sum_oracle import LRS, RHO, make_model, record, relative_errors
from helpers.exact_sum_oracle import N_STEPS as EXACT_STEPS
from helpers.spawn import spawn
from helpers.trajectories import model_and_batches, trajectory
from helpers.wake_oracle import N_STEPS, check_wake, effective_fishers, kl_wake, run

from kldwrm_fast import QEKLDWRM, QKLDWRM
from kldwrm_fast.experiments.datasets import load_mnist_sample
from kldwrm_fast.experiments.models import paper_cnn


@pytest.mark.parametrize("curvature_sum", ["reweighted", "exact"])
@pytest.mark.parametrize("lrs", [[0.05] * N_STEPS, [0.05 * 1.15**k for k in range(N_STEPS)]], ids=["4.2", "A.1"])
@pytest.mark.parametrize("stat_freq", [1, 3])
def test_prop_4_2_and_a_1_q_kld_wrm_solves_its_wake_objective(lrs, stat_freq, curvature_sum):
    """With the exact curvature the re-weighting of (S82) is exact (``ρF̄_{k−1} + cF_k = F̄_k + F_k/λ_k``), so both
    modes must solve the objective; the exact mode gets there through its joint basis instead."""
    rho = 0.5
    history = run(QKLDWRM, lrs, stat_freq=stat_freq, rho=rho, clip=None, curvature_sum=curvature_sum)
    fishers = effective_fishers(history, rho)

    def objective(k, s, steps):  # (28) / (100) with B_k = F_k, eq. (20) on steps without new statistics
        g_k, b_k, lr_k = history[k][0], fishers[k], history[k][3]
        return g_k @ s + 0.5 * s @ b_k @ s + kl_wake(k, s, steps, fishers, rho, 1.0 / lr_k)

    check_wake(history, objective)


def test_the_fisher_changes_along_the_trajectory():
    """The oracle tests are only meaningful if F_k (and so B_k) really varies with k."""
    history = run(QKLDWRM, [0.05] * N_STEPS, rho=0.5, clip=None)
    first, last = history[0][1], history[-1][1]
    assert (first - last).norm() > 1e-3 * first.norm()


@pytest.mark.parametrize("lrs", LRS.values(), ids=LRS.keys())
@pytest.mark.parametrize("cadence", [1, 3])
def test_exact_mode_minimises_the_two_term_kronecker_sum_objective(lrs, cadence):
    history = record(lrs, cadence, 0.0, "exact")
    assert max(relative_errors(history, 0.0)) < 1e-10


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_a_due_step_without_new_statistics_at_every_step_cadence_follows_eq_20(damping):
    """``stat_freq = inv_freq = 1`` with a step that captured nothing: no decomposition, the recursion stays in the
    parameter basis, and the sum is ``(1 + lr) Ā_j ⊗ Γ̄_j`` (M rotated back out of the eigenbasis)."""
    history = record(LRS["varying"], 1, damping, "exact", eval_steps=(4, 5))
    assert max(relative_errors(history, damping)) < 1e-10


@pytest.mark.parametrize("cadence", [1, 3])
def test_the_reweighted_mode_does_not(cadence):
    """Approach 2 approximates ``F̄ + lr B`` by ``(Ā + lr A) ⊗ (Γ̄ + lr Γ)``: a real difference, of order lr."""
    history = record(LRS["fixed"], cadence, 0.0, "reweighted")
    errors = relative_errors(history, 0.0)
    assert min(errors) > 1e-3


@pytest.mark.parametrize("lrs", LRS.values(), ids=LRS.keys())
@pytest.mark.parametrize("cadence", [1, 3])
def test_with_damping_the_conjugate_gradients_solve_the_damped_sum(lrs, cadence):
    damping = 0.01
    history = record(lrs, cadence, damping, "exact")
    assert max(relative_errors(history, damping)) < 1e-10


@pytest.mark.parametrize("cadence", [1, 3])
def test_without_iterations_damping_is_exact_where_the_local_factors_commute_with_their_averages(cadence):
    """The conjugate gradients start from the solve with the operator's diagonal in the joint basis: exact on step 0
    (``Ā_0 = A_0``) and on steps without new statistics (eq. (20)), where ``δ`` adds to the eigenvalue products as
    in the reweighted mode, and not on the other steps (so the iterations are needed there)."""
    damping = 0.01
    history = record(LRS["varying"], cadence, damping, "exact", iterations=0)
    commuting = [k for k in range(EXACT_STEPS) if k == 0 or k % cadence]
    assert max(relative_errors(history, damping, commuting)) < 1e-10
    others = [k for k in range(EXACT_STEPS) if k not in commuting]
    assert min(relative_errors(history, damping, others)) > 1e-3


def test_qe_with_no_inner_steps_is_q_in_exact_mode():
    net_q, x, y = make_model()
    net_qe, _, _ = make_model()
    common = dict(lr=0.05, rho=RHO, damping=0.01, clip=None, stat_freq=3, inv_freq=3, predictive="gaussian")
    q = QKLDWRM(net_q, fisher="empirical", curvature_sum="exact", **common)
    qe = QEKLDWRM(net_qe, fisher="empirical", curvature_sum="exact", n_inner=0, **common)
    for _ in range(7):
        for net, opt in ((net_q, q), (net_qe, qe)):
            opt.zero_grad()
            (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
            opt.step()
    for p_q, p_qe in zip(net_q.parameters(), net_qe.parameters()):
        torch.testing.assert_close(p_q, p_qe, rtol=0, atol=0)


def test_curvature_sum_is_checked():
    net, _, _ = make_model()
    expected = r"^Invalid curvature_sum: 'dense'; expected one of \('reweighted', 'exact'\)$"
    with pytest.raises(ValueError, match=expected):
        QKLDWRM(net, curvature_sum="dense")


def test_a_checkpoint_resumes_only_with_its_curvature_sum():
    net, x, y = make_model()
    opt = QKLDWRM(net, curvature_sum="exact")
    opt.zero_grad()
    (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
    opt.step()
    other = QKLDWRM(make_model()[0])
    with pytest.raises(ValueError, match="saved with curvature_sum='exact', loading into curvature_sum='reweighted'"):
        other.load_state_dict(opt.state_dict())


EXACT = dict(curvature_sum="exact", bias="separate", eigenvalue_floor=1e-6, kl_clip=0.1)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter"
)
@pytest.mark.parametrize("cls", [QKLDWRM, QEKLDWRM])
def test_exact_mode_follows_the_torch_trajectory_on_triton(cls):
    pytest.importorskip("triton")
    extra = dict(EXACT, **(dict(n_inner=2) if cls is QEKLDWRM else {}))
    model, batches = model_and_batches(dtype=torch.float64)
    reference, _ = trajectory(cls, "torch", copy.deepcopy(model), batches, **extra)
    ours, _ = trajectory(cls, "triton", model, batches, **extra)
    for a, b in zip(ours, reference):
        assert (a - b).norm() <= 1e-10 * b.norm()


@pytest.mark.parametrize("cls", [QKLDWRM, QEKLDWRM])
@pytest.mark.parametrize("resume_at", [3, 4, 5])  # before a cached, an inverse, a fresh step (stat 2, inv 4)
def test_exact_mode_resumes_bit_identically(cls, resume_at):
    model, batches = model_and_batches()
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=4, **EXACT)
    for k, (x, y) in enumerate(batches):
        if k == resume_at:
            twin_model = copy.deepcopy(model)
            twin = cls(twin_model, lr=0.05, stat_freq=2, inv_freq=4, **EXACT)
            twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        for net, optimizer in ((model, opt), (twin_model, twin)) if k >= resume_at else ((model, opt),):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
    assert len(batches) >= resume_at + 2
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_exact_mode_on_two_ranks_equals_one_process(tmp_path):
    out = str(tmp_path / "params")
    extra = dict(curvature_sum="exact", kl_clip=0.1)
    spawn(worker.data_parallel, 2, "QKLDWRM", extra, out)
    expected = worker.single_process("QKLDWRM", 2, extra)
    results = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for result in results:
        for ours, theirs in zip(result["params"], expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # Per inverse step, each rank's share: the averages' and the whitened local factors' decompositions.
    calls = [name for result in results for name in result["eig_calls"]]
    assert len(calls) == 2 * 4 * 2 * len(range(0, worker.STEPS, 4))
    assert sum("whitened local" in name for name in calls) == len(calls) // 2


def train_paper_cnn(lr, steps=93, **options):
    """Q on the paper CNN, batches of 128 from the embedded MNIST sample: test accuracy after ``steps``."""
    data = load_mnist_sample()
    torch.manual_seed(0)
    model = paper_cnn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = QKLDWRM(model, lr=lr, **options)
        order = torch.randperm(len(data.train_x), generator=torch.Generator().manual_seed(0))
        for k in range(steps):
            rows = order[(k % 31) * 128 : (k % 31 + 1) * 128]
            opt.zero_grad()
            F.cross_entropy(model(data.train_x[rows]), data.train_y[rows]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(data.test_x).argmax(1) == data.test_y).float().mean().item()


def test_q_trains_the_paper_cnn_at_three_times_its_default_lr():
    """Without the cap the same run ends at 0.088 (every ReLU dead); with it, 0.96 (0.94 at the default lr)."""
    assert train_paper_cnn(0.03) > 0.85


def test_without_the_cap_q_dies_at_three_times_its_default_lr():
    """The failure the cap prevents, so that the test above cannot pass for another reason."""
    assert train_paper_cnn(0.03, max_step_rms=None) < 0.3


def small_run(lr, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    opt = QKLDWRM(model, lr=lr, stat_freq=2, inv_freq=2, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_at_the_default_lr_the_cap_changes_nothing():
    assert torch.equal(small_run(0.01), small_run(0.01, max_step_rms=None))


def test_above_it_the_cap_is_said_once_and_bounds_every_step():
    with pytest.warns(UserWarning, match=r"steps are capped at RMS max_step_rms=0.02 \(clip 0.4 at this lr\)") as seen:
        capped = small_run(0.05)
    assert sum("steps are capped" in str(w.message) for w in seen) == 1
    assert not torch.equal(capped, small_run(0.05, max_step_rms=None))


@pytest.mark.parametrize("cls", [QKLDWRM, QEKLDWRM])
def test_an_invalid_max_step_rms_is_refused_with_one_line(cls):
    with pytest.raises(ValueError, match=r"Invalid max_step_rms: 0; expected max_step_rms > 0 or None"):
        cls(torch.nn.Linear(2, 2), max_step_rms=0)
