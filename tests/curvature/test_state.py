"""The per-block state has one definition (kldwrm_fast/curvature/state.py): every key any optimizer writes, at
any cadence, is declared there, with the shape its kind implies."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.curvature.state import BlockState

FACTOR_KEYS = {"A", "A_ea", "QA", "QA_hat", "G", "G_ea", "QG", "QG_hat"}
EIGENVALUE_KEYS = {"dA", "dA_hat", "dG", "dG_hat"}


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM, QEKLDWRM])
@pytest.mark.parametrize("cadence", [(1, 1), (1, 3), (2, 2)])
def test_every_state_key_is_declared_with_its_shape(cls, cadence):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = cls(model, lr=0.05, stat_freq=cadence[0], inv_freq=cadence[1])
    declared = set(BlockState.__annotations__)
    for k in range(4):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for block, state in zip(opt.curvature.blocks, opt.block_states()):
            assert set(state) <= declared, set(state) - declared
            n_out, n_in = block.shape
            for key, value in state.items():
                side = n_in if key.lstrip("Qd").startswith("A") else n_out
                expected = (side, side) if key in FACTOR_KEYS else (side,) if key in EIGENVALUE_KEYS else (n_out, n_in)
                assert tuple(value.shape) == expected, (k, block.name, key)


@pytest.mark.parametrize("cls", [KFAC, SOKLDWRM, QKLDWRM])
@pytest.mark.parametrize("what", ["load_state_dict", "damping"])
def test_a_state_dict_or_damping_set_mid_run_governs_the_next_plain_steps(cls, what):
    """Plain steps keep values made from the state (KFAC's views of its momentum buffers, the preconditioners'
    eigenvalue products and denominators on the PyTorch backend). Rewinding the same optimizer to an earlier
    ``state_dict``, or changing the damping between plain steps, must give the steps a fresh optimizer takes; and
    the loaded ``state_dict`` is not advanced by the steps of the optimizers that loaded it."""
    torch.manual_seed(0)
    data = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(6)]

    def run(opt, model, batches):
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def build():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        return model, cls(model, lr=0.05, stat_freq=3, inv_freq=3, fisher="empirical")

    model, opt = build()
    run(opt, model, data[:2])
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    fresh_model, fresh = build()
    with torch.no_grad():
        for p, w in zip(fresh_model.parameters(), weights):
            p.copy_(w)
    if what == "load_state_dict":
        run(opt, model, data[2:3])  # a plain step on other values, then rewind the same optimizer
        opt.load_state_dict(saved)
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
    fresh.load_state_dict(saved)
    if what == "damping":
        for o in (opt, fresh):
            o.param_groups[0]["damping"] = 0.3
    run(opt, model, data[3:5])  # plain steps (3 and 4 with stat_freq=3: step 3 is a statistics step)
    run(fresh, fresh_model, data[3:5])
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    assert saved["state"]["global"]["step"] == 2
