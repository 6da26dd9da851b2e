"""The public contract of docs/algorithms.md §3–§5: plain loop, schedulers, closures, hooks, fallbacks, errors."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM]


def small_cnn(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    ).to(dtype)


def batch(n=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen, dtype=dtype), torch.randint(0, 5, (n,), generator=gen)


def train(opt, model, steps, x, y):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_loop_fits_a_batch_with_factors_in_the_parameter_dtype(cls, fisher, dtype):
    model = small_cnn(dtype)
    x, y = batch(dtype=dtype)
    opt = cls(model, lr=0.05, fisher=fisher, stat_freq=2, inv_freq=4)
    losses = train(opt, model, 40, x, y)
    assert losses[-1] < 0.5 * losses[0]
    for block in opt.curvature.blocks:
        state = opt.state[block.key]
        assert all(state[key].dtype == dtype for key in ("A", "G", "A_ea", "G_ea", "QA", "dA", "QG", "dG"))


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_step_with_closure_returns_the_loss_and_matches_the_plain_loop(cls):
    x, y = batch()
    model_a = small_cnn()
    model_b = copy.deepcopy(model_a)
    torch.manual_seed(1)
    opt_a = cls(model_a, lr=0.05, stat_freq=1, inv_freq=2)
    torch.manual_seed(1)
    opt_b = cls(model_b, lr=0.05, stat_freq=1, inv_freq=2)
    train(opt_a, model_a, 3, x, y)

    def closure():
        opt_b.zero_grad()
        loss = F.cross_entropy(model_b(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt_b.step(closure)
        assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [SOKLDWRM, QKLDWRM])
def test_an_lr_scheduler_drives_lambda(cls):
    """A scheduler's lr at every step is the λ_k = 1/lr_k of the recursion (same as setting it by hand)."""
    x, y = batch()
    base = small_cnn()
    runs = {}
    for mode in ("scheduler", "manual", "constant"):
        model = copy.deepcopy(base)
        torch.manual_seed(2)
        opt = cls(model, lr=0.1, stat_freq=1, inv_freq=1)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        for k in range(4):
            if mode == "manual":
                opt.param_groups[0]["lr"] = 0.1 * 0.5**k
            elif mode == "constant":
                opt.param_groups[0]["lr"] = 0.1
            train(opt, model, 1, x, y)
            if mode == "scheduler":
                scheduler.step()
        runs[mode] = parameters(model)
    for a, b in zip(runs["scheduler"], runs["manual"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(runs["scheduler"], runs["constant"]))


def test_hooks_are_removable():
    model = small_cnn()
    counts = lambda: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    before = counts()
    opt = QKLDWRM(model)
    assert counts() > before
    opt.remove_hooks()
    assert counts() == before


def test_unsupported_parameters_get_plain_gradient_descent_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3))
    with pytest.warns(UserWarning, match=r"plain gradient descent.*: 1\.weight$"):
        opt = KFAC(model, lr=0.1, weight_decay=0.01, stat_freq=1, inv_freq=1)
    prelu = model[1]
    before = prelu.weight.detach().clone()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = prelu.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(prelu.weight.detach(), before - 0.1 * (grad + 0.01 * before))


def test_no_warning_when_every_parameter_is_in_a_block():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KFAC(small_cnn())


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_sampled_fisher_leaves_grad_equal_to_the_true_label_gradient(cls):
    x, y = batch()
    model = small_cnn()
    plain = copy.deepcopy(model)
    cls(model, fisher="sampled", stat_freq=1, inv_freq=1)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        _CountBackward.calls += 1
        return grad


class _Counter(nn.Module):
    def forward(self, x):
        return _CountBackward.apply(x)


def test_sampled_fisher_costs_one_extra_backward_on_statistics_steps_only():
    model = nn.Sequential(nn.Linear(4, 6), _Counter(), nn.Tanh(), nn.Linear(6, 3))
    opt = QKLDWRM(model, fisher="sampled", stat_freq=3, inv_freq=3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    calls = []
    for _ in range(6):
        _CountBackward.calls = 0
        train(opt, model, 1, x, y)
        calls.append(_CountBackward.calls)
    assert calls == [2, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("inplace", [False, True])
def test_sampled_backward_stops_at_layer_outputs_and_computes_no_weight_gradients(inplace):
    """The sampled pass differentiates to the layer outputs; only an output rewritten in place (here by
    ReLU(inplace=True)) makes its layer's weight the target instead."""
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = KFAC(model, fisher="sampled", stat_freq=1, inv_freq=1)
    weights = [model[0].weight, model[2].weight, model[4].weight]
    counts = [0, 0, 0]
    for i, weight in enumerate(weights):
        weight.register_hook(lambda grad, i=i: counts.__setitem__(i, counts[i] + 1))
    train(opt, model, 1, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    assert counts == ([2, 1, 1] if inplace else [1, 1, 1])


def test_sampled_gaussian_regression_trains():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
    x = torch.randn(128, 3)
    y = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)
    opt = QKLDWRM(model, lr=0.05, predictive="gaussian", stat_freq=2, inv_freq=2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_eval_mode_collects_no_statistics():
    x, y = batch()
    model = small_cnn()
    opt = KFAC(model, stat_freq=1, inv_freq=1)
    train(opt, model, 1, x, y)
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items() if torch.is_tensor(v)}
    model.eval()
    train(opt, model, 1, x, y)
    for key in ("A", "G", "A_ea", "G_ea", "QA"):
        torch.testing.assert_close(opt.state[model[0].weight][key], state[key], rtol=0, atol=0)


def test_a_layer_without_captured_statistics_is_named_and_takes_gradient_descent():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    opt = KFAC(model, fisher="empirical", stat_freq=1, inv_freq=1)
    x = torch.randn(5, 4)
    out = F.linear(model[0](x), model[1].weight, model[1].bias)  # second layer used functionally
    F.cross_entropy(out, torch.randint(0, 3, (5,))).backward()
    expected = model[1].weight.detach() - opt.param_groups[0]["lr"] * model[1].weight.grad
    with pytest.warns(UserWarning, match=r"layer '1' has no curvature yet"):
        opt.step()
    torch.testing.assert_close(model[1].weight.detach(), expected, rtol=0, atol=1e-7)


def test_sampled_fisher_requires_a_tensor_output():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    model = Pair()
    opt = KFAC(model)  # noqa: F841 (held: a dropped optimizer removes its hooks)
    with pytest.raises(TypeError, match="fisher='empirical'"):
        model(torch.randn(4, 3))


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("before", [2, 3, 4], ids=["next-fresh", "next-cached", "next-inverse"])
def test_state_dict_round_trip_continues_identically(cls, before):
    """Saved before a step with new statistics, an inverse step, and a step without either (cadence 2/4)."""
    x, y = batch()
    model = small_cnn()
    opt = cls(model, lr=0.05, stat_freq=2, inv_freq=4)
    train(opt, model, before, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(opt, model, 5, x, y)
    expected = parameters(model)

    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed, lr=0.05, stat_freq=2, inv_freq=4)
    opt2.load_state_dict(saved_opt)
    train(opt2, resumed, 5, x, y)
    for a, b in zip(expected, parameters(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_model_without_supported_layers_is_rejected():
    expected = r"no trainable nn.Linear, nn.Conv2d \(groups=1\), nn.Embedding or affine normalisation layer"
    with pytest.raises(ValueError, match=expected):
        KFAC(nn.Sequential(nn.LayerNorm(3, elementwise_affine=False), nn.PReLU()))


@pytest.mark.parametrize(
    "cls,kwargs,name",
    [
        (KFAC, dict(lr=float("nan")), "lr"),
        (KFAC, dict(lr=-1.0), "lr"),
        (SOKLDWRM, dict(rho=1.0), "rho"),
        (QKLDWRM, dict(rho=-0.1), "rho"),
        (KFAC, dict(damping=-1e-3), "damping"),
        (KFAC, dict(weight_decay=-1.0), "weight_decay"),
        (QKLDWRM, dict(stat_freq=0), "stat_freq"),
        (QKLDWRM, dict(stat_freq=2.5), "stat_freq"),
        (QKLDWRM, dict(stat_freq=4, inv_freq=6), "inv_freq"),
        (KFAC, dict(fisher="exact"), "fisher"),
        (KFAC, dict(predictive="poisson"), "predictive"),
        (KFAC, dict(backend="metal"), "backend"),
        (KFAC, dict(momentum=1.0), "momentum"),
        (KFAC, dict(kl_clip=0.0), "kl_clip"),
        (SOKLDWRM, dict(kl_clip=-1.0), "kl_clip"),
        (QKLDWRM, dict(clip=0.0), "clip"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(cls, kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}\b"):
        cls(small_cnn(), **kwargs)


def test_a_scheduler_setting_a_negative_lr_is_an_error():
    x, y = batch()
    model = small_cnn()
    opt = QKLDWRM(model)
    opt.param_groups[0]["lr"] = -0.01
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step()


def test_disabled_clipping_is_accepted():
    KFAC(small_cnn(), kl_clip=None)
    SOKLDWRM(small_cnn(), kl_clip=None)
    QKLDWRM(small_cnn(), clip=None)


@pytest.mark.parametrize("fisher", ["sampled", "empirical"])
def test_in_place_activations_do_not_change_the_statistics(fisher):
    factors = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3)).double()
        opt = KFAC(model, fisher=fisher, stat_freq=1, inv_freq=1)
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        train(opt, model, 1, x, y)
        factors.append([opt.state[layer.weight]["G"] for layer in (model[0], model[2])])
    for plain, in_place in zip(*factors):
        torch.testing.assert_close(in_place, plain, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [*OPTIMIZERS, QEKLDWRM])
def test_memory_usage_counts_every_state_tensor_by_block_and_kind(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    opt = cls(model, stat_freq=1, inv_freq=2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    usage = opt.memory_usage()
    first = usage["by_block"][opt.curvature.blocks[0].name]  # Linear(6, 5): A 7×7, Γ 5×5, float32
    for kind in ("local factors", "averages", "eigenvectors"):
        assert first[kind] == 4 * (7 * 7 + 5 * 5), kind
    assert first["eigenvalues"] == 4 * (7 + 5)
    every = [t for state in opt.block_states() for t in state.values() if torch.is_tensor(t)]
    block_bytes = sum(t.numel() * t.element_size() for t in every)
    assert sum(usage["by_kind"].values()) == block_bytes
    assert sum(sum(kinds.values()) for kinds in usage["by_block"].values()) == block_bytes
    assert usage["total"] == block_bytes + usage["other"]  # no two blocks share a stacked tensor here
    n_params = sum(p.numel() for p in model.parameters())
    if cls is KFAC:
        assert usage["by_kind"]["momentum"] == 4 * n_params
    if cls in (QKLDWRM, QEKLDWRM):
        assert usage["by_kind"]["recursion"] == 3 * 4 * n_params  # Ĝ, previous V, M
    if cls is QEKLDWRM:
        assert usage["other"] >= 4 * 4 * n_params  # n_cap = 4 parameter snapshots
