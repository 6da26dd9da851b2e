"""QE-KLD-WRM: the symmetric KL, the wake objective Φ, its inner solver, snapshots and training."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kldwrm_fast import QEKLDWRM, QKLDWRM
from kldwrm_fast.optim import wake
from kldwrm_fast.optim.wake import symmetric_kl_categorical, symmetric_kl_gaussian


def test_categorical_symmetric_kl_closed_form():
    a = torch.log(torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float64))
    b = torch.zeros(1, 2, dtype=torch.float64)
    forward = (1 / 3) * math.log(2 / 3) + (2 / 3) * math.log(4 / 3)
    backward = 0.5 * math.log(3 / 2) + 0.5 * math.log(3 / 4)
    torch.testing.assert_close(
        symmetric_kl_categorical(a, b), torch.tensor([0.5 * (forward + backward)], dtype=torch.float64)
    )
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(symmetric_kl_categorical(x, y), symmetric_kl_categorical(y, x))
    torch.testing.assert_close(
        symmetric_kl_categorical(x, x + 3.0), torch.zeros(5, dtype=torch.float64)
    )  # shift-invariant
    assert (symmetric_kl_categorical(x, y) > 0).all()


def test_gaussian_symmetric_kl_closed_form():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(symmetric_kl_gaussian(a, b), torch.tensor([2.0, 12.5], dtype=torch.float64))
    torch.testing.assert_close(symmetric_kl_gaussian(a, a), torch.zeros(2, dtype=torch.float64))


def tiny_net():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()


@pytest.mark.parametrize("predictive", ["categorical", "gaussian"])
def test_twice_the_divergence_approaches_the_fisher_quadratic_form(predictive):
    """Eq. (7): 2 D(θ, θ + εu) / ε² → uᵀ F(θ) u as ε → 0."""
    net = tiny_net()
    x = torch.randn(30, 3, dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach() for p in net.parameters()]
    u = [torch.randn_like(p) for p in theta]

    def output(values):
        return functional_call(net, dict(zip(names, values)), (x,))

    jac = torch.autograd.functional.jacobian(lambda *v: output(v), tuple(theta))
    j = torch.cat([t.reshape(30, 4, -1) for t in jac], dim=2)  # (N, out, P)
    if predictive == "categorical":
        p = torch.softmax(output(theta), 1)
        metric = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        metric = torch.eye(4, dtype=torch.float64).expand(30, 4, 4)
    fisher = torch.einsum("nop,noq,nqr->pr", j, metric, j) / 30
    flat_u = torch.cat([t.reshape(-1) for t in u])
    quadratic = flat_u @ fisher @ flat_u
    eps = 1e-4
    moved = output([t + eps * d for t, d in zip(theta, u)])
    divergence = wake.symmetric_kl(output(theta), moved, predictive)
    assert abs(2 * divergence / eps**2 - quadratic) / quadratic < 1e-3


def classification_batches(n_batches=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 6, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)) for _ in range(n_batches)
    ]


def small_cnn():
    torch.manual_seed(7)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2), nn.Linear(32, 3))


def run(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_zero_inner_steps_reproduce_q_exactly():
    batches = classification_batches()
    model_q, model_qe = small_cnn(), small_cnn()
    torch.manual_seed(1)
    opt_q = QKLDWRM(model_q, lr=0.05, stat_freq=1, inv_freq=2)
    torch.manual_seed(1)
    opt_qe = QEKLDWRM(model_qe, lr=0.05, stat_freq=1, inv_freq=2, n_inner=0)
    torch.manual_seed(2)
    run(opt_q, model_q, batches)
    torch.manual_seed(2)
    run(opt_qe, model_qe, batches)
    for a, b in zip(model_q.parameters(), model_qe.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.fixture
def captured_objectives(monkeypatch):
    """Run checks inside real QE steps, while the parameters are still θ_k."""
    seen = []
    original = wake.WakeObjective.minimise

    def minimise(self, steps, n_steps, lr):
        result = original(self, steps, n_steps, lr)
        seen.append(dict(objective=self, start=[s.clone() for s in steps], end=result,
                         phi_start=self.value(steps).item(), phi_end=self.value(result).item(),
                         check=seen_check[0](self, steps) if seen_check else None))  # fmt: skip
        return result

    seen_check = []
    monkeypatch.setattr(wake.WakeObjective, "minimise", minimise)
    return seen, seen_check


def double_model():
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def double_batches(n=5):
    gen = torch.Generator().manual_seed(3)
    return [
        (torch.randn(12, 3, dtype=torch.float64, generator=gen), torch.randint(0, 3, (12,), generator=gen))
        for _ in range(n)
    ]


def test_inner_loop_lowers_phi(captured_objectives):
    seen, _ = captured_objectives
    model = double_model()
    opt = QEKLDWRM(model, lr=0.1, stat_freq=1, inv_freq=1, n_inner=10, kl_scale=1.0, clip=None)
    run(opt, model, double_batches())
    assert len(seen) == 5
    assert all(entry["phi_end"] < entry["phi_start"] for entry in seen)


def test_phi_gradient_matches_finite_differences(captured_objectives):
    seen, check = captured_objectives
    results = []

    def finite_difference(objective, steps):
        direction = [torch.randn_like(s) for s in steps]
        analytic = sum((g * d).sum() for g, d in zip(objective.gradient(steps), direction))
        h = 1e-6
        plus = objective.value([s + h * d for s, d in zip(steps, direction)])
        minus = objective.value([s - h * d for s, d in zip(steps, direction)])
        results.append((analytic.item(), ((plus - minus) / (2 * h)).item()))

    check.append(finite_difference)
    model = double_model()
    opt = QEKLDWRM(model, lr=0.1, stat_freq=1, inv_freq=1, n_inner=2, kl_scale=1.0)
    run(opt, model, double_batches(4))
    assert len(results) == 4
    for analytic, numeric in results:
        assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric))


@pytest.mark.parametrize("cadence", [1, 3])
def test_phi_equals_its_literal_definition(captured_objectives, cadence):
    """Weights λ_k κ(i) kl_scale ρ^{k−i}, the B_k s term and D against fresh copies of the stored networks.
    B_k is the step's local curvature in the sense of eq. (20): the local factors on a step with new
    statistics, the averages Γ̄_q, Ā_q on one without."""
    seen, check = captured_objectives
    rho, lr, kl_scale, n_cap = 0.6, 0.1, 0.3, 3
    history = []

    def literal(objective, steps):
        k = len(history)
        model, opt = history_model[0], history_model[1]
        x = objective.args[0]
        current = [p.detach().clone() for p in model.parameters()]
        history.append(current)
        s = [torch.randn_like(t) * 0.01 for t in steps]
        total = 0.0
        fresh = k % cadence == 0
        for block, v, si in zip(opt.curvature.blocks, objective.gradients, s):
            state = opt.state[block.key]
            g, a = (state["G"], state["A"]) if fresh else (state["G_ea"], state["A_ea"])
            total += (v * si).sum() + 0.5 * (si * (g @ si @ a)).sum()
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for block, si in zip(opt.curvature.blocks, s):
                for p_moved, part in zip(
                    [dict(moved.named_parameters())[objective.names[id(p)]] for p in block.params], block.unflatten(si)
                ):
                    p_moved.add_(part)
        moved.eval()
        for i in range(max(0, k - n_cap + 1), k + 1):
            old = copy.deepcopy(model)
            with torch.no_grad():
                for p, value in zip(old.parameters(), history[i]):
                    p.copy_(value)
            old.eval()
            kappa = 1.0 if i == 0 else 1.0 - rho
            d = wake.symmetric_kl(old(x), moved(x), "categorical")
            total += (1.0 / lr) * kappa * kl_scale * rho ** (k - i) * d
        return (objective.value(s) - total).abs().item() / abs(total.item())

    check.append(literal)
    model = double_model()
    opt = QEKLDWRM(
        model, lr=lr, rho=rho, stat_freq=cadence, inv_freq=cadence, n_inner=1, n_cap=n_cap, kl_scale=kl_scale
    )
    history_model = (model, opt)
    run(opt, model, double_batches(6))
    assert len(seen) == 6
    assert max(entry["check"] for entry in seen) < 1e-12


def test_only_n_cap_snapshots_are_kept():
    model = double_model()
    opt = QEKLDWRM(model, lr=0.1, stat_freq=1, inv_freq=1, n_inner=1, n_cap=3)
    n_params = sum(p.numel() for p in model.parameters())
    thetas = []
    for x, y in double_batches(7):
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        run(opt, model, [(x, y)])
        assert opt.state["snapshots"]["buffer"].shape == (3, n_params)
    entries = opt.snapshots()
    assert [i for i, _ in entries] == [4, 5, 6]
    for i, values in entries:
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in values]), thetas[i], rtol=0, atol=0)


def test_state_dict_resume_continues_identically():
    batches = classification_batches(8)
    model = small_cnn()
    opt = QEKLDWRM(model, lr=0.05, stat_freq=2, inv_freq=2, n_inner=3)
    run(opt, model, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    torch.manual_seed(5)
    run(opt, model, batches[3:])
    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = QEKLDWRM(resumed, lr=0.05, stat_freq=2, inv_freq=2, n_inner=3)
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(5)
    run(opt2, resumed, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_with_closure_and_modes_restored():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    model[3].eval()  # a submodule the user keeps in eval mode
    opt = QEKLDWRM(model, lr=0.05, stat_freq=1, inv_freq=1, n_inner=2)
    assert type(opt.curvature.blocks[1]).__name__ == "NormBlock"  # its affine parameters, not its statistics
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    reference = copy.deepcopy(model)
    reference(x)  # the closure's own train-mode forward is the only one that may touch running statistics
    loss = opt.step(closure)
    assert torch.isfinite(loss)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(model[1].running_var, reference[1].running_var, rtol=0, atol=0)
    assert model.training and model[1].training and not model[3].training


def test_step_without_a_recorded_batch_is_an_error():
    model = double_model()
    opt = QEKLDWRM(model, stat_freq=5, inv_freq=5)
    batches = double_batches(2)
    run(opt, model, batches[:1])
    x, y = batches[1]
    with torch.no_grad():
        model(x)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="needs a train-mode forward call"):
        opt.step()


def test_categorical_outputs_must_be_batch_by_classes():
    model = nn.Sequential(nn.Linear(3, 4))
    opt = QEKLDWRM(model, fisher="empirical", stat_freq=1, inv_freq=1)
    x = torch.randn(2, 5, 3)
    opt.zero_grad()
    F.cross_entropy(model(x).reshape(10, 4), torch.randint(0, 4, (10,))).backward()
    with pytest.raises(ValueError, match=r"shape \(batch, classes\).*\(2, 5, 4\)"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(n_cap=0), "n_cap"),
        (dict(n_inner=-1), "n_inner"),
        (dict(inner_lr_ratio=0.0), "inner_lr_ratio"),
        (dict(kl_scale=-1.0), "kl_scale"),
        (dict(clip=0.0), "clip"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}\b"):
        QEKLDWRM(double_model(), **kwargs)


def test_gaussian_regression_trains():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    x, x_test = torch.randn(256, 3), torch.randn(128, 3)
    target = lambda z: torch.stack([z[:, 0] * z[:, 1], torch.sin(z[:, 2])], 1)  # noqa: E731
    opt = QEKLDWRM(model, lr=0.05, predictive="gaussian", stat_freq=5, inv_freq=5, n_inner=3)
    held_out = lambda: 0.5 * (model(x_test) - target(x_test)).pow(2).sum(1).mean().item()  # noqa: E731
    start = held_out()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        (0.5 * (model(x[idx]) - target(x[idx])).pow(2).sum(1).mean()).backward()
        opt.step()
    assert held_out() < 0.3 * start


def test_classification_trains():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    x_train, y_train, x_test, y_test = x[:1297], y[:1297], x[1297:], y[1297:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = QEKLDWRM(model, lr=0.03, stat_freq=10, inv_freq=10, n_inner=3)
    held_out = lambda: F.cross_entropy(model(x_test), y_test).item()  # noqa: E731
    start = held_out()
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        idx = torch.randint(0, len(y_train), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    assert held_out() < 0.25 * start


@pytest.mark.parametrize("predictive, shape", [("categorical", (7, 4)), ("gaussian", (7, 2, 3)), ("gaussian", (7,))])
def test_stored_divergences_equal_one_symmetric_kl_per_stored_output(predictive, shape):
    gen = torch.Generator().manual_seed(3)
    stored = torch.randn(3, *shape, generator=gen, dtype=torch.float64)
    output = torch.randn(*shape, generator=gen, dtype=torch.float64)
    expected = torch.stack([wake.symmetric_kl(target, output, predictive) for target in stored])
    torch.testing.assert_close(wake.stored_divergences(stored, output, predictive), expected, rtol=1e-14, atol=0)
    assert expected.shape == (3,) and (expected > 0).all()


def test_categorical_divergence_names_outputs_that_are_not_logits():
    with pytest.raises(ValueError, match=r"predictive='categorical'.*\(batch, classes\).*\(3, 7, 4\)"):
        wake.stored_divergences(torch.zeros(2, 3, 7, 4), torch.zeros(3, 7, 4), "categorical")
