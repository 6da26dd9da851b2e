"""A layer called several times in one forward pass is weight sharing, not gradient accumulation (issue 36.1;
docs/algorithms.md §1 "Repeated calls")."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


class Repeated(nn.Module):
    """``sum(layer(x) for _ in range(c)) / c``: the same function for every ``c``."""

    def __init__(self, calls):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(6, 4)
        self.calls = calls

    def forward(self, x):
        return sum(self.layer(x) for _ in range(self.calls)) / self.calls


def data(k, n=24):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 4, (n,), generator=gen)


def trajectory(cls, calls, fisher, cadence, repeated_calls, steps=5):
    model = Repeated(calls).double()
    torch.manual_seed(1)  # the sampled Fisher's generator seed
    stat_freq, inv_freq = cadence
    extra = dict(momentum=0.0, kl_clip=None) if cls is KFAC else {}
    opt = cls(
        model, lr=0.05, fisher=fisher, stat_freq=stat_freq, inv_freq=inv_freq, repeated_calls=repeated_calls, **extra
    )
    weights = []
    for k in range(steps):
        x, y = data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        weights.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return torch.stack(weights)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
@pytest.mark.parametrize("cadence", [(1, 1), (2, 4)])
def test_reduce_gives_the_step_of_one_call_for_every_number_of_calls(cls, fisher, cadence):
    one = trajectory(cls, 1, fisher, cadence, "reduce")
    for calls in (2, 4):
        torch.testing.assert_close(trajectory(cls, calls, fisher, cadence, "reduce"), one, rtol=1e-10, atol=1e-12)


def captured_factors(calls_inputs, repeated_calls):
    """The local factors of a layer called on each of ``calls_inputs`` in one forward, and the explicit rows."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, xs):
            outputs = [self.layer(x) for x in xs]
            for out in outputs:
                out.retain_grad()
            self.outputs = outputs
            return sum(out.sum(dim=-2) if out.dim() == 3 else out for out in outputs)

    model = Net()
    opt = KFAC(model, fisher="empirical", stat_freq=1, inv_freq=1, repeated_calls=repeated_calls)
    y = torch.tensor([0, 1, 1, 0])
    F.cross_entropy(model(calls_inputs), y).backward()
    errors = [out.grad for out in model.outputs]
    opt.step()
    return opt.block_state(opt.curvature.blocks[0]), errors


def with_ones(x):
    rows = x.reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def test_expand_averages_the_input_rows_of_every_call_and_sums_their_output_factors():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    state, errors = captured_factors(xs, "expand")
    rows = torch.cat([with_ones(x) for x in xs])
    torch.testing.assert_close(state["A"], rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-14)
    gamma = sum(4 * e.T @ e for e in errors)  # m = 4 samples per call
    torch.testing.assert_close(state["G"], gamma, rtol=1e-12, atol=1e-14)


def test_reduce_pairs_the_mean_input_with_the_summed_output_gradient():
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    state, errors = captured_factors(xs, "reduce")
    mean = with_ones(sum(xs) / 3)
    torch.testing.assert_close(state["A"], mean.T @ mean / 4, rtol=1e-12, atol=1e-14)
    summed = sum(errors)
    torch.testing.assert_close(state["G"], 4 * summed.T @ summed, rtol=1e-12, atol=1e-14)


def test_reduce_expands_calls_of_different_shapes():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 2, 3, generator=gen, dtype=torch.float64), torch.randn(4, 5, 3, generator=gen).double()]
    reduced, _ = captured_factors(xs, "reduce")
    expanded, _ = captured_factors(xs, "expand")
    for key in ("A", "G"):
        torch.testing.assert_close(reduced[key], expanded[key], rtol=0, atol=0)


def test_passes_of_gradient_accumulation_stay_a_sample_weighted_mean():
    """Two forwards with a backward each before one step are two passes, not calls of one pass: ``Γ`` is the mean
    of their factors (expand would sum them, reduce would pair their rows)."""
    factors = {}
    for mode in ("expand", "reduce"):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        opt = KFAC(model, fisher="empirical", stat_freq=1, inv_freq=1, repeated_calls=mode)
        errors = []
        for k in range(2):
            x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
            out = model(x)
            out.retain_grad()
            (F.cross_entropy(out, y) / 2).backward()
            errors.append(out.grad * 2)  # the empirical statistics take each pass's loss as divided by 2
        opt.step()
        factors[mode] = opt.block_state(opt.curvature.blocks[0])["G"]
        torch.testing.assert_close(factors[mode], sum(4 * e.T @ e for e in errors) / 2, rtol=1e-12, atol=1e-14)


def test_an_invalid_repeated_calls_is_refused_with_one_line():
    with pytest.raises(ValueError, match=r"Invalid repeated_calls: 'sum'; expected one of \('expand', 'reduce'\)"):
        KFAC(nn.Linear(2, 2), repeated_calls="sum")


def test_a_checkpoint_resumes_only_with_its_own_repeated_calls():
    model = Repeated(2)
    state = KFAC(model, repeated_calls="reduce").state_dict()
    with pytest.raises(ValueError, match="saved with repeated_calls='reduce'"):
        KFAC(Repeated(2)).load_state_dict(state)
