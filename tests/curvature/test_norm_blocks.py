"""Scale-and-shift blocks for normalisation layers (Note [scale-and-shift blocks] in
:mod:`kldwrm_fast.curvature.blocks`; docs/algorithms.md §1): the diagonal Fisher of ``(γ, β)`` from per-sample
gradients, computed here by autograd sample by sample or from the definition of each normalisation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


def per_sample_fisher(model, norm, x, y):
    """``(1/B) Σ_n g_n²`` with ``g_n`` the gradient of sample n's own loss w.r.t. ``[γ, β]`` (autograd, one sample at a
    time: valid for normalisations that do not mix samples)."""
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    rows = []
    for n in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    rows = torch.stack(rows)
    return (rows * rows).mean(0)


CASES = {
    "LayerNorm": (lambda: nn.LayerNorm(5), (7, 5)),
    "LayerNorm without bias": (lambda: nn.LayerNorm(5, bias=False), (7, 5)),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (7, 4, 3, 3)),
    **({"RMSNorm": (lambda: nn.RMSNorm(5), (7, 5))} if hasattr(nn, "RMSNorm") else {}),
}


def model_around(norm, shape):
    torch.manual_seed(0)
    if len(shape) == 2:
        body = [nn.Linear(shape[1], shape[1]), norm, nn.Tanh(), nn.Linear(shape[1], 3)]
    else:
        body = [nn.Conv2d(shape[1], shape[1], 1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(shape[1] * 9, 3)]
    model = nn.Sequential(*body).double()
    with torch.no_grad():  # away from the initial γ = 1, β = 0, where scale and shift rows could hide a mix-up
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_the_factor_is_the_diagonal_fisher_of_per_sample_gradients(case):
    make, shape = CASES[case]
    norm = make()
    model = model_around(norm, shape)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (shape[0],), generator=gen)
    expected = per_sample_fisher(model, norm, x, y)
    opt = KFAC(model, lr=0.0, stat_freq=1, inv_freq=1, fisher="empirical")
    F.cross_entropy(model(x), y).backward()
    opt.step()
    state = opt.state[norm.weight]
    assert state["A"].shape == expected.shape and state["G"].tolist() == [[1.0]]
    torch.testing.assert_close(state["A"], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_rows_are_each_samples_output_gradient_times_its_normalised_input(dims):
    torch.manual_seed(0)
    channels, batch = 3, 6
    norm = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(channels).double()
    shape = (batch, channels) if dims == 1 else (batch, channels, 4, 4)
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.Linear(channels * (1 if dims == 1 else 16), 2)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 2, (batch,))
    opt = KFAC(model, lr=0.0, stat_freq=1, inv_freq=1, fisher="empirical")
    captured = []

    def keep(module, inputs, output):
        output.register_hook(captured.append)

    norm.register_forward_hook(keep)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    reduce = (0,) if dims == 1 else (0, 2, 3)
    mean, var = x.mean(reduce, keepdim=True), x.var(reduce, unbiased=False, keepdim=True)
    normalised = (x - mean) / torch.sqrt(var + norm.eps)
    e = captured[0]
    per_sample = [e * normalised, e] if dims == 1 else [(e * normalised).sum((2, 3)), e.sum((2, 3))]
    rows = torch.cat(per_sample, dim=1)
    torch.testing.assert_close(opt.state[norm.weight]["A"], batch * (rows * rows).sum(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_a_layernorm_over_a_sequence_takes_positions_or_sequences_as_samples(mode):
    torch.manual_seed(0)
    norm = nn.LayerNorm(4).double()
    model = nn.Sequential(nn.Linear(4, 4), norm, nn.Linear(4, 2)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    target = torch.randn(3, 5, 2, dtype=torch.float64)
    opt = KFAC(model, lr=0.0, stat_freq=1, inv_freq=1, fisher="empirical", predictive="gaussian", weight_sharing=mode)
    captured = []

    def keep(module, inputs, output):
        captured.append(inputs[0])
        output.register_hook(captured.append)

    norm.register_forward_hook(keep)
    F.mse_loss(model(x), target).backward()
    opt.step()
    h, e = captured
    normalised = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + norm.eps)
    rows = torch.cat([e * normalised, e], dim=-1)
    rows = rows.reshape(-1, 8) if mode == "expand" else rows.sum(1)
    expected = rows.shape[0] * (rows * rows).sum(0)
    torch.testing.assert_close(opt.state[norm.weight]["A"], expected, rtol=1e-10, atol=1e-14)


def test_the_step_equals_the_dense_solve_with_the_diagonal_fisher():
    make, shape = CASES["LayerNorm"]
    norm = make()
    model = model_around(norm, shape)
    damping, lr = 0.05, 0.3
    opt = KFAC(model, lr=lr, damping=damping, momentum=0.0, kl_clip=None, stat_freq=1, inv_freq=1, rho=0.0,
               fisher="empirical")  # fmt: skip
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    before = torch.cat([norm.weight.detach(), norm.bias.detach()])
    F.cross_entropy(model(x), y).backward()
    v = torch.cat([norm.weight.grad, norm.bias.grad])
    opt.step()
    fisher = torch.kron(opt.state[norm.weight]["G"], torch.diag(opt.state[norm.weight]["A"]))
    solved = torch.linalg.solve(fisher + damping * torch.eye(10, dtype=torch.float64), v)
    torch.testing.assert_close(torch.cat([norm.weight.detach(), norm.bias.detach()]), before - lr * solved,
                               rtol=1e-10, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_batchnorm_running_statistics_are_the_layers_own(cls):
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3, momentum=0.3).double()
    model = nn.Sequential(norm, nn.Linear(3, 2)).double()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2)
    mean = torch.zeros(3, dtype=torch.float64)
    for k in range(4):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64) + k
        mean = 0.7 * mean + 0.3 * x.mean(0)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
        opt.step()
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-12, atol=1e-14)
    assert norm.num_batches_tracked.item() == 4
    assert [type(b).__name__ for b in opt.curvature.blocks] == ["NormBlock", "KroneckerBlock"]


def test_a_resnet_block_with_batchnorm_leaves_nothing_to_plain_gradient_descent():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(x + self.norm(self.conv(x)))

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Residual(), Residual(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))  # fmt: skip
    opt = KFAC(model, bias="separate")
    assert opt.curvature.other_params == []
    assert sum(type(b).__name__ == "NormBlock" for b in opt.curvature.blocks) == 3
