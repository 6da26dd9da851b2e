"""``curvature_sum="exact"``: Q-KLD-WRM with the two-term Kronecker sum of eq. (81) inverted exactly (the paper's
"approach 1"), checked against dense solves built with ``torch.kron`` (docs/algorithms.md §3).

Oracle, float64, per layer (row-major vec, so ``vec(Γ S A) = (Γ ⊗ A) vec(S)``): with the factors the optimizer
recorded, ``F̄_j = Γ̄_j ⊗ Ā_j`` (eq. (78)) and ``B_k = Γ_k ⊗ A_k`` (eq. (79); on a step without new statistics
``B_k = F̄_q``, eq. (20)), the Q step at k minimises (101)/(102)::

    ⟨ĝ_k, s⟩ + (λ_k/2) sᵀ (F̄_k + B_k/λ_k + δ I) s,     ĝ_k = g_k + λ_k Σ_{j<k} ρ^{k−j} F̄_j s_j

written over the recorded history (the steps s_j actually taken), not by the recursion the optimizer runs.
"""

import copy
import os

import distributed_worker as worker
import pytest
import torch
import torch.nn.functional as F
from test_backends import model_and_batches, trajectory
from test_distributed import spawn
from torch import nn

from kldwrm_fast import QEKLDWRM, QKLDWRM

N_STEPS, RHO = 10, 0.5


def make_model(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(24, 3, dtype=torch.float64)
    y = torch.randn(24, 2, dtype=torch.float64)
    return net, x, y


def block_form(layer, tensors):
    weight, bias = tensors
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def record(lrs, cadence, damping, curvature_sum, iterations=50, eval_steps=()):
    """Run Q on the tiny network; per step and layer ``(V, S, Γ, A, Γ̄, Ā, lr)`` (local factors as used).

    With damping, the conjugate gradients run to rounding level (the largest layer has 16 unknowns). Steps in
    ``eval_steps`` run the forward in eval mode: nothing is captured, so a due step has no new statistics and
    no decomposition (eq. (20) holds with the last inverse step's averages)."""
    net, x, y = make_model()
    opt = QKLDWRM(
        net, lr=lrs[0], rho=RHO, damping=damping, clip=None, stat_freq=cadence, inv_freq=cadence,
        fisher="empirical", predictive="gaussian", curvature_sum=curvature_sum,
    )  # fmt: skip
    opt.exact_damping_iterations = iterations
    layers = [net[0], net[2]]
    history = []
    for k, lr in enumerate(lrs):
        opt.param_groups[0]["lr"] = lr
        before = [block_form(layer, [layer.weight.detach().clone(), layer.bias.detach().clone()]) for layer in layers]
        opt.zero_grad()
        net.train(k not in eval_steps)
        (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
        grads = [block_form(layer, [layer.weight.grad.clone(), layer.bias.grad.clone()]) for layer in layers]
        opt.step()
        fresh = k % cadence == 0 and k not in eval_steps
        entry = []
        for layer, v, old in zip(layers, grads, before):
            state = opt.state[layer.weight]
            g_ea, a_ea = state["G_ea"].clone(), state["A_ea"].clone()
            local = (state["G"].clone(), state["A"].clone()) if fresh else (g_ea, a_ea)
            step = block_form(layer, [layer.weight.detach(), layer.bias.detach()]) - old
            entry.append((v, step, *local, g_ea, a_ea, lr))
        history.append(entry)
    opt.remove_hooks()
    return history


def oracle_step(history, k, layer, damping):
    """The minimiser of (102) for one layer at step k (module docstring), by a dense solve."""
    v, _, g_local, a_local, g_ea, a_ea, lr = history[k][layer]
    g_hat = v.reshape(-1).clone()
    for j in range(k):
        _, s_j, _, _, g_ea_j, a_ea_j, _ = history[j][layer]
        g_hat += (1.0 / lr) * RHO ** (k - j) * (torch.kron(g_ea_j, a_ea_j) @ s_j.reshape(-1))
    n = g_hat.numel()
    system = torch.kron(g_ea, a_ea) + lr * torch.kron(g_local, a_local) + damping * torch.eye(n, dtype=g_hat.dtype)
    return (-lr * torch.linalg.solve(system, g_hat)).reshape(v.shape)


def relative_errors(history, damping, steps=None):
    """Per step, the largest relative error of a layer's step against the oracle."""
    errors = []
    for k in range(len(history)) if steps is None else steps:
        worst = 0.0
        for layer in range(len(history[k])):
            expected = oracle_step(history, k, layer, damping)
            worst = max(worst, ((history[k][layer][1] - expected).norm() / expected.norm()).item())
        errors.append(worst)
    return errors


LRS = {"fixed": [0.05] * N_STEPS, "varying": [0.05 * 1.15**k for k in range(N_STEPS)]}


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
    commuting = [k for k in range(N_STEPS) if k == 0 or k % cadence]
    assert max(relative_errors(history, damping, commuting)) < 1e-10
    others = [k for k in range(N_STEPS) if k not in commuting]
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
