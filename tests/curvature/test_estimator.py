"""The curvature estimator: one cadence source, and the data-parallel path's local factors through the dispatched
fused factor update (equal to the unfused Gram to 1e-12 in float64 on every backend that runs here)."""

import pytest
import torch
from torch import nn

from kldwrm_fast import KFAC
from kldwrm_fast.ops import reference
from kldwrm_fast.ops.backends import IMPLEMENTATIONS, unavailable_reason

BACKENDS = [b for b in IMPLEMENTATIONS if unavailable_reason(b, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,n", [(1, 3), (37, 5), (200, 17)])
def test_local_factors_go_through_the_dispatched_factor_update(backend, rows, n):
    model = nn.Linear(4, 3).double()
    opt = KFAC(model, backend=backend)
    calls = []
    fused = opt._ops.factor_update

    def counting(*args):
        calls.append(args[0].shape)
        return fused(*args)

    opt._ops = type(opt._ops)(opt._ops.backend, {**opt._ops.functions, "factor_update": counting})
    x = torch.randn(rows, n, dtype=torch.float64)
    local = opt.estimator._local_factor(x, 1.0 / rows, torch.float64)
    assert calls == [(rows, n)]
    torch.testing.assert_close(local, reference.gram(x, 1.0 / rows, torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(local, local.T)


def test_the_hooks_and_the_step_read_one_cadence():
    model = nn.Linear(4, 3)
    opt = KFAC(model, stat_freq=2, inv_freq=4)
    opt.global_state["step"] = 2
    assert opt.curvature.capture_due() and opt.estimator.statistics_due()
    opt.param_groups[0]["stat_freq"] = 3  # e.g. a loaded state_dict's group
    assert not opt.curvature.capture_due()
    opt.global_state["step"] = 3
    assert opt.curvature.capture_due()
