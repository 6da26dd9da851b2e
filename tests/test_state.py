"""The per-block state has one definition (kldwrm_fast/curvature/state.py): every key any optimizer writes, at
any cadence, is declared there, with the shape its kind implies."""

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
