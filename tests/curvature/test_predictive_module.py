"""An optimizer built from a submodule whose output is not the loss's distribution (issue 36.2; docs/algorithms.md
§4 "Whose output is the distribution")."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]


class EncoderAndHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


class PassThrough(nn.Module):
    """A wrapper that returns its model's output as it is."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def data(k=0):
    gen = torch.Generator().manual_seed(k)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def train_step(opt, model, k=0):
    x, y = data(k)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_the_sampled_fisher_of_a_submodule_inside_a_model_that_transforms_its_output_is_refused(cls):
    model = EncoderAndHead()
    opt = cls(model.encoder, stat_freq=1, inv_freq=1)
    train_step(opt, model, 0)  # the modules around the encoder are seen at its first forward, judged at the next
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # and every captured forward after, until one passes
        with pytest.raises(ValueError, match=r"runs inside EncoderAndHead.*predictive_module=.*fisher='empirical'"):
            train_step(opt, model, 1)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_qe_is_refused_on_a_submodule_even_with_the_empirical_fisher():
    model = EncoderAndHead()
    opt = QEKLDWRM(model.encoder, fisher="empirical", stat_freq=1, inv_freq=1)
    train_step(opt, model, 0)
    with pytest.raises(ValueError, match="runs inside EncoderAndHead"):
        train_step(opt, model, 1)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_the_empirical_fisher_of_a_submodule_trains(cls):
    model = EncoderAndHead()
    opt = cls(model.encoder, fisher="empirical", stat_freq=1, inv_freq=1)
    for k in range(3):
        train_step(opt, model, k)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
def test_predictive_module_gives_the_submodule_the_statistics_of_the_full_model(cls):
    """The sampled loss is drawn at the full model's output: the encoder's factors are those an optimizer built
    from the full model computes for the same layers."""
    factors = []
    for whole in (True, False):
        model = EncoderAndHead().double()
        torch.manual_seed(7)  # the sampled Fisher's generator seed
        opt = cls(model, stat_freq=1, inv_freq=1) if whole else cls(model.encoder, predictive_module=model,
                                                                     stat_freq=1, inv_freq=1)  # fmt: skip
        x, y = data()
        opt.zero_grad()
        F.cross_entropy(model(x.double()), y).backward()
        opt.step()
        states = {block.name.removeprefix("encoder."): opt.block_state(block) for block in opt.curvature.blocks}
        factors.append({name: (state["A"], state["G"]) for name, state in states.items() if name in ("0", "2")})
    for name in ("0", "2"):
        for whole_factor, part_factor in zip(factors[0][name], factors[1][name]):
            torch.testing.assert_close(part_factor, whole_factor, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_wrapper_that_passes_the_output_through_is_accepted(cls):
    inner = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    model = PassThrough(inner)
    opt = cls(inner, stat_freq=1, inv_freq=1)
    for k in range(3):
        train_step(opt, model, k)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not opt.curvature._watching  # judged, and no longer watched


def test_a_predictive_module_that_does_not_contain_the_model_is_refused_with_one_line():
    with pytest.raises(ValueError, match="Invalid predictive_module: Linear; expected the nn.Module whose output"):
        KFAC(nn.Linear(3, 3), predictive_module=nn.Linear(3, 3))


def test_qe_refuses_a_predictive_module():
    model = EncoderAndHead()
    with pytest.raises(ValueError, match="Invalid predictive_module: QEKLDWRM measures its KL terms"):
        QEKLDWRM(model.encoder, predictive_module=model)
