"""Torn, edited and foreign checkpoints (issue 34): each refused in one line naming what is wrong, and a failed
``load_state_dict`` leaves the optimizer exactly as it was, so that training continues as if it had not been called."""

import copy

import pytest
import torch
from helpers.small_models import small_model
from helpers.small_models import train_steps as train
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]




def trained(cls, **options):
    model = small_model()
    opt = cls(model, lr=0.05, stat_freq=1, inv_freq=2, **options)
    train(opt, model, range(3))
    return model, opt


def same(a, b):
    """Whether two state_dict trees are equal, tensors bit for bit (NaN equal to NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num())
    return a == b


def first_block(state_dict):
    return state_dict["state"][0]


def nan_factor(sd):
    first_block(sd)["A_ea"][0, 0] = float("nan")


def wrong_dtype(sd):
    first_block(sd)["QA"] = first_block(sd)["QA"].double()


def missing_eigenvalues(sd):
    del first_block(sd)["dA"]


def missing_average(sd):
    del first_block(sd)["G_ea"]


def missing_step(sd):
    del sd["state"]["global"]["step"]


def lost_param_groups(sd):
    del sd["param_groups"]


def broken_generator(sd):
    sd["curvature"]["generator"] = torch.zeros(3, dtype=torch.uint8)  # fails inside the sampler, after the checks


def torch_group_mismatch(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]  # torch.optim refuses it, mid-load


CORRUPTIONS = [
    (nan_factor, r"'A_ea' of layer '0' holds non-finite values"),
    (wrong_dtype, r"'QA' of layer '0' is torch.float64; the layer's state is torch.float32"),
    (missing_eigenvalues, r"layer '0' has 'QA' but no 'dA'"),
    (missing_average, r"layer '0' has 'A_ea' but no 'G_ea'"),
    (missing_step, r"the global 'step' is None"),
    (lost_param_groups, r"'param_groups' is missing"),
    (torch_group_mismatch, r"size of optimizer's group"),
]


@pytest.mark.parametrize("corrupt, message", CORRUPTIONS, ids=[c.__name__ for c, _ in CORRUPTIONS])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_corrupted_state_dict_is_refused_in_one_line_and_changes_nothing(cls, corrupt, message):
    model, opt = trained(cls)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(opt.state_dict())
    corrupt(bad)
    with pytest.raises(ValueError, match=message) as error:
        opt.load_state_dict(bad)
    assert "\n" not in str(error.value)
    assert same(opt.state_dict(), before)
    # and it trains on as an optimizer that was never asked to load
    reference_model = copy.deepcopy(model)
    reference = cls(reference_model, lr=0.05, stat_freq=1, inv_freq=2)
    reference.load_state_dict(copy.deepcopy(before))
    train(opt, model, range(3, 6))
    train(reference, reference_model, range(3, 6))
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [QKLDWRM, KFAC])
def test_a_failure_after_the_checks_restores_the_state_the_optimizer_had(cls):
    model, opt = trained(cls, fisher="sampled")
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    first_block(bad)["A_ea"] *= 2  # a valid state, loaded before the sampler's fails
    broken_generator(bad)
    with pytest.raises(RuntimeError):
        opt.load_state_dict(bad)
    assert same(opt.state_dict(), before)


def test_a_state_dict_of_another_model_changes_nothing():
    model, opt = trained(KFAC)
    wide = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3))
    other = KFAC(wide, lr=0.05, stat_freq=1, inv_freq=1)
    train(other, wide, range(1))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"'0'.*shape"):
        opt.load_state_dict(copy.deepcopy(other.state_dict()))
    assert same(opt.state_dict(), before)


def test_an_untouched_state_dict_passes_every_check_for_every_option_that_adds_state():
    for cls, options in [(KFAC, dict(damping_form="factored")), (KFAC, dict(rank=4)), (KFAC, dict(momentum=0.9)),
                         (QKLDWRM, dict(inv_freq=4)), (QKLDWRM, dict(curvature_sum="exact")), (QEKLDWRM, {}),
                         (SOKLDWRM, dict(eigensolver="warm"))]:  # fmt: skip
        options = dict(dict(inv_freq=2), **options)
        model = small_model()
        opt = cls(model, lr=0.05, stat_freq=1, **options)
        train(opt, model, range(3))
        saved = copy.deepcopy(opt.state_dict())
        fresh = cls(copy.deepcopy(model), lr=0.05, stat_freq=1, **options)
        fresh.load_state_dict(saved)
        assert same(fresh.state_dict(), saved)
