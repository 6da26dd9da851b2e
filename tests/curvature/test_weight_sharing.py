"""``weight_sharing``: a Linear layer applied to ``(batch, seq, features)`` shares its weight over the sequence; its
factors follow K-FAC-expand (every position a sample, the default) or K-FAC-reduce (inputs averaged and output
gradients summed over the sequence first), Eschenhagen et al. 2023 (Note [weight sharing over a sequence];
docs/algorithms.md §1). Float64, against the definitions built from the captured per-position quantities."""

import warnings

import pytest
import torch
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


class Shared(nn.Module):
    """A Linear layer over every position of a sequence, then a per-sequence head (a flattening Linear)."""

    def __init__(self, seq=6):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.head = nn.Linear(3 * seq, 2)

    def forward(self, x):
        hidden = self.inner(x)
        if hidden.requires_grad:  # (not in QE's functional evaluations)
            hidden.retain_grad()
            self.hidden = hidden
        return self.head(torch.tanh(hidden).flatten(1))


def problem(seq=6, batch=5, seed=0):
    torch.manual_seed(seed)
    model = Shared(seq).double()
    x = torch.randn(batch, seq, 4, dtype=torch.float64)
    y = torch.randn(batch, 2, dtype=torch.float64)
    return model, x, y


def loss_of(model, x, y):
    return 0.5 * (model(x) - y).pow(2).sum(1).mean()


def definitions(x, e, mode):
    """``(A, Γ)`` of the shared layer by the note's formulas, from its inputs ``x`` and output gradients ``e``."""
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype)
    a = torch.cat([x, ones], -1)
    if mode == "reduce":
        a, e = a.mean(1), e.sum(1)
    a, e = a.reshape(-1, a.shape[-1]), e.reshape(-1, e.shape[-1])
    rows = a.shape[0]
    return a.T @ a / rows, rows * e.T @ e


def optimizer(cls, model, mode, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model, fisher="empirical", predictive="gaussian", weight_sharing=mode, **options)


@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_the_factors_equal_their_definitions(mode):
    model, x, y = problem()
    opt = optimizer(KFAC, model, mode, stat_freq=1, inv_freq=1)
    loss_of(model, x, y).backward()
    expected_a, expected_g = definitions(x, model.hidden.grad, mode)
    opt.step()
    state = opt.state[model.inner.weight]
    torch.testing.assert_close(state["A"], expected_a, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state["G"], expected_g, rtol=1e-12, atol=1e-14)


def test_the_reduce_step_is_the_dense_solve_with_its_factors():
    model, x, y = problem()
    lr, damping = 0.1, 0.01
    opt = optimizer(KFAC, model, "reduce", lr=lr, damping=damping, momentum=0.0, kl_clip=None, stat_freq=1, inv_freq=1)
    loss_of(model, x, y).backward()
    factor_a, factor_g = definitions(x, model.hidden.grad, "reduce")
    layer = model.inner
    v = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], 1)
    before = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], 1).clone()
    opt.step()
    after = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], 1)
    dense = torch.kron(factor_g, factor_a) + damping * torch.eye(v.numel(), dtype=v.dtype)
    expected = -lr * torch.linalg.solve(dense, v.reshape(-1)).reshape(v.shape)
    torch.testing.assert_close(after - before, expected, rtol=1e-10, atol=1e-14)


def trajectory(cls, mode, seq, steps=5):
    model, _, _ = problem(seq)
    opt = optimizer(cls, model, mode, lr=0.05, stat_freq=1, inv_freq=2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        x = torch.randn(5, seq, 4, dtype=torch.float64, generator=gen)
        y = torch.randn(5, 2, dtype=torch.float64, generator=gen)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_reduce_equals_expand_at_sequence_length_one_and_differs_past_it(cls):
    assert torch.equal(trajectory(cls, "reduce", 1), trajectory(cls, "expand", 1))
    reduced, expanded = trajectory(cls, "reduce", 6), trajectory(cls, "expand", 6)
    assert (reduced - expanded).norm() > 1e-3 * expanded.norm()


def test_the_option_is_recorded_and_a_checkpoint_resumes_only_with_its_own():
    model, x, y = problem()
    opt = optimizer(QKLDWRM, model, "reduce", stat_freq=1, inv_freq=1)
    loss_of(model, x, y).backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["weight_sharing"] == "reduce"
    other = optimizer(QKLDWRM, problem()[0], "expand")
    with pytest.raises(ValueError, match="saved with weight_sharing='reduce', loading into weight_sharing='expand'"):
        other.load_state_dict(saved)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_an_invalid_weight_sharing_is_refused_with_one_line(cls):
    model, _, _ = problem()
    with pytest.raises(ValueError, match=r"^Invalid weight_sharing: 'mean'; expected one of \('expand', 'reduce'\)$"):
        cls(model, weight_sharing="mean")
