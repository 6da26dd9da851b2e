"""Parameters without a curvature block routed to a torch.optim optimizer (``others=``; issue 36.3,
:mod:`kldwrm_fast.optim.routing`)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM

OPTIMIZERS = [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM]
ADAMW = dict(lr=3e-3, weight_decay=0.01)


class Recurrent(nn.Module):
    """An embedding (a block) and a GRU (no curvature block) under a Linear head (a block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(7, 6)
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.head = nn.Linear(8, 7)

    def forward(self, x):
        hidden, _ = self.rnn(self.embedding(x))
        return self.head(hidden[:, -1])


def data(k):
    gen = torch.Generator().manual_seed(k)
    x = torch.randint(0, 7, (16, 5), generator=gen)
    return x, x[:, 0].clone()


def build(cls, model=None, **options):
    model = model or Recurrent()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, cls(model, stat_freq=2, inv_freq=2, others=torch.optim.AdamW, others_kwargs=ADAMW, **options)


def step(opt, model, k, scaler=None):
    x, y = data(k)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def routed(model):
    return [p for name, p in model.named_parameters() if name.startswith("rnn")]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_routed_parameters_take_the_steps_of_the_other_optimizer(cls):
    """Each routed parameter moves exactly as a standalone AdamW moves a copy of it given the same gradients."""
    model, opt = build(cls)
    shadows = [p.detach().clone().requires_grad_() for p in routed(model)]
    reference = torch.optim.AdamW(shadows, **ADAMW)
    head_before = model.head.weight.detach().clone()
    for k in range(5):
        x, y = data(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for shadow, p in zip(shadows, routed(model)):
            shadow.grad = p.grad.clone()
        reference.step()
        opt.step()
        for shadow, p in zip(shadows, routed(model)):
            torch.testing.assert_close(p, shadow, rtol=0, atol=0)
    assert not torch.equal(model.head.weight, head_before)  # the head is the curvature optimizer's
    assert [type(s).__name__ for s in (opt._others.optimizer,)] == ["AdamW"]


def test_the_construction_warning_names_the_routing_and_no_plain_gradient_descent():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        KFAC(Recurrent(), others=torch.optim.AdamW, others_kwargs=dict(lr=1e-3))
    messages = [str(w.message) for w in caught]
    assert any("routed to AdamW(lr=0.001) (others=): rnn.weight_ih_l0, rnn.weight_hh_l0" in m for m in messages)
    assert not any("plain gradient descent" in m for m in messages)


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_zero_grad_and_a_scheduler_act_on_the_routed_parameters_too(cls):
    model, opt = build(cls)
    step(opt, model, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step(opt, model, 1)
    schedule.step()
    assert opt._others.optimizer.param_groups[0]["lr"] == ADAMW["lr"] / 2
    assert opt.param_groups[0]["lr"] == 0.01 / 2
    assert opt.param_groups[1] is opt._others.optimizer.param_groups[0]


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_a_state_dict_round_trip_resumes_bit_for_bit(cls):
    model, opt = build(cls)
    for k in range(3):
        step(opt, model, k)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for k in range(3, 6):
        step(opt, model, k)
    resumed, opt2 = build(cls)
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[1] is opt2._others.optimizer.param_groups[0]  # the shared dict, after loading too
    for k in range(3, 6):
        step(opt2, resumed, k)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_a_state_dict_with_routing_is_refused_by_an_optimizer_without():
    model, opt = build(KFAC)
    step(opt, model, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = KFAC(Recurrent(), stat_freq=2, inv_freq=2)
    with pytest.raises(ValueError, match=r"saved with parameters routed to another optimizer \(others=\)"):
        plain.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("when", [0, 1])  # a statistics step (checked on the host), a plain one (on the device)
def test_a_skipped_step_leaves_the_routed_parameters_and_their_state_alone(cls, when):
    model, opt = build(cls)
    step(opt, model, 0)
    if when:
        step(opt, model, 1)  # step 2 is then a statistics step; step 1 was plain
    before = [p.detach().clone() for p in routed(model)]
    moments = [s["exp_avg"].clone() for s in opt._others.optimizer.state.values()]
    x, y = data(5)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model.rnn.weight_hh_l0.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
        _ = opt.skipped_steps  # reports a plain step's device-side skip
    assert all(torch.equal(a, p) for a, p in zip(before, routed(model)))
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, opt._others.optimizer.state.values()))


@pytest.mark.parametrize("cls", [KFAC, QKLDWRM])
def test_a_grad_scaler_unscales_the_routed_gradients(cls):
    runs = []
    for scaled in (False, True):
        model, opt = build(cls, model=Recurrent().double())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
        for k in range(4):
            step(opt, model, k, scaler)
        runs.append([p.detach().clone() for p in routed(model)])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_invalid_routing_arguments_are_refused_with_one_line():
    with pytest.raises(ValueError, match="Invalid others: 3; expected a torch.optim.Optimizer class"):
        KFAC(Recurrent(), others=3)
    with pytest.raises(ValueError, match="Invalid others_kwargs: given without others"):
        KFAC(Recurrent(), others_kwargs=dict(lr=1.0))
    with pytest.raises(ValueError, match="Invalid others_kwargs: 1.0; expected a dict"):
        KFAC(Recurrent(), others=torch.optim.AdamW, others_kwargs=1.0)
    with pytest.raises(ValueError, match="Invalid others: .* built a list; expected a torch.optim.Optimizer"):
        KFAC(Recurrent(), others=list)
