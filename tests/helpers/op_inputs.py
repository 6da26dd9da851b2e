"""Inputs of the fused operations for the tests: eigendecompositions of SPD factors, block-form matrices, and one
valid argument tuple per operation for ``torch.library.opcheck``."""

import torch

from helpers.matrices import spd


def eig(matrix):
    values, vectors = torch.linalg.eigh(matrix)
    return vectors, values.clamp_min(0.0)


def preconditioner_inputs(n_out, n_in, dtype, batch=(), device="cpu"):
    """``(q_g, d_g, q_a, d_a, v)`` for a (batch of) (n_out, n_in) block(s)."""
    q_g, d_g = eig(spd(n_out, dtype, batch, device))
    q_a, d_a = eig(spd(n_in, dtype, batch, device))
    v = torch.randn(*batch, n_out, n_in, dtype=dtype, device=device)
    return q_g, d_g, q_a, d_a, v


def opcheck_cases(device="cpu"):
    """One float64 argument tuple per operation (batches of two blocks)."""
    dtype = torch.float64
    x, ea = torch.randn(7, 3, dtype=dtype, device=device), spd(3, dtype, (), device)
    q_g, d_g, q_a, d_a, v = preconditioner_inputs(2, 3, dtype, (2,), device)
    ea_g, ea_a = spd(2, dtype, (2,), device), spd(3, dtype, (2,), device)
    lists = [[torch.randn(2, 3, dtype=dtype, device=device) for _ in range(2)] for _ in range(4)]
    return {
        "factor_update": (x, ea, torch.empty_like(ea), 0.5, 0.9, 1.1, False, True),
        "precondition": (q_g, d_g, q_a, d_a, v, 0.01),
        "q_precondition": (q_g, d_g, q_a, d_a, v, 0.01, 0.1, ea_g, ea_a),
        "ghat_recursion": (*lists[:3], lists[3], 0.5),
    }
