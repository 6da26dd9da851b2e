"""SOKLDWRM (docs/algorithms.md §3 "SOKLDWRM"): the recursive step is the minimiser of its wake objective (26), with
a varying λ that of (100) with B = 0 (Props. 4.1, A.1), in the exact float64 setting of
:mod:`helpers.wake_oracle`."""

import pytest
from helpers.wake_oracle import N_STEPS, check_wake, effective_fishers, kl_wake, run

from kldwrm_fast import SOKLDWRM


@pytest.mark.parametrize("lrs", [[0.05] * N_STEPS, [0.05 * 0.8**k for k in range(N_STEPS)]], ids=["fixed", "varying"])
@pytest.mark.parametrize("stat_freq", [1, 3])
def test_prop_4_1_so_kld_wrm_solves_its_wake_objective(lrs, stat_freq):
    rho = 0.33
    history = run(SOKLDWRM, lrs, stat_freq=stat_freq, rho=rho, kl_clip=None)
    fishers = effective_fishers(history, rho)

    def objective(k, s, steps):  # (26); with λ_k, (100) with B = 0
        return history[k][0] @ s + kl_wake(k, s, steps, fishers, rho, 1.0 / history[k][3])

    check_wake(history, objective)
