"""The fused operations as ``torch.library`` custom ops (namespace ``kldwrm_fast``).

Each operation exists once per backend under the same schema: ``kldwrm_fast::<op>`` is the PyTorch
reference (any device; the CPU path and the CUDA fallback), ``kldwrm_fast::<op>_triton`` the Triton kernels
(:mod:`kldwrm_fast.ops.triton_kernels`), and ``kldwrm_fast::<op>_cuda`` the CUDA extension's (defined in C++,
``csrc/registration.cpp``; fakes added by :mod:`kldwrm_fast.ops.cuda_ext`). Every op has a fake
implementation so ``torch.compile`` can trace through the optimizer step. :func:`register` defines one
backend's four ops from its implementation functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kldwrm_fast.ops import reference


def _factor_update_fake(x, ea, reweighted, scale, rho, reweight, first, with_reweighted):
    return ea.new_empty(ea.shape)


def _precondition_fake(q_out, d_out, q_in, d_in, v, damping):
    return torch.empty_like(v)


def _q_precondition_fake(q_out, d_out, q_in, d_in, g_hat, damping, lr, ea_out, ea_in):
    return torch.empty_like(g_hat), torch.empty_like(g_hat)


def _ghat_recursion_fake(v_new, g_hat, v_prev, m, coef):
    return None


FAKES = {
    "factor_update": _factor_update_fake,
    "precondition": _precondition_fake,
    "q_precondition": _q_precondition_fake,
    "ghat_recursion": _ghat_recursion_fake,
}
"""Fake (meta) implementations by operation name, shared by every backend's registration."""


def register(suffix: str, implementations: dict[str, Callable]) -> dict[str, Callable]:
    """Define ``kldwrm_fast::<op><suffix>`` for the four operations; return the registered ops by name.

    ``implementations`` maps "factor_update", "precondition", "q_precondition", "ghat_recursion" to
    functions with the signatures of :mod:`kldwrm_fast.ops.reference`.
    """

    def factor_update(
        x: Tensor, ea: Tensor, reweighted: Tensor, scale: float, rho: float, reweight: float, first: bool,
        with_reweighted: bool,
    ) -> Tensor:  # fmt: skip
        return implementations["factor_update"](x, ea, reweighted, scale, rho, reweight, first, with_reweighted)

    def precondition(q_out: Tensor, d_out: Tensor, q_in: Tensor, d_in: Tensor, v: Tensor, damping: float) -> Tensor:
        return implementations["precondition"](q_out, d_out, q_in, d_in, v, damping)

    def q_precondition(
        q_out: Tensor, d_out: Tensor, q_in: Tensor, d_in: Tensor, g_hat: Tensor, damping: float, lr: float,
        ea_out: Tensor, ea_in: Tensor,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        return implementations["q_precondition"](q_out, d_out, q_in, d_in, g_hat, damping, lr, ea_out, ea_in)

    def ghat_recursion(
        v_new: list[Tensor], g_hat: list[Tensor], v_prev: list[Tensor], m: list[Tensor], coef: float
    ) -> None:
        implementations["ghat_recursion"](v_new, g_hat, v_prev, m, coef)

    specs = [
        (factor_update, ("ea", "reweighted")),
        (precondition, ()),
        (q_precondition, ()),
        (ghat_recursion, ("g_hat", "v_prev")),
    ]
    ops = {}
    for function, mutates in specs:
        op = torch.library.custom_op(f"kldwrm_fast::{function.__name__}{suffix}", mutates_args=mutates)(function)
        op.register_fake(FAKES[function.__name__])
        ops[function.__name__] = op
    return ops


REFERENCE_OPS = register(
    "",
    {
        "factor_update": reference.factor_update,
        "precondition": reference.precondition,
        "q_precondition": reference.q_precondition,
        "ghat_recursion": reference.ghat_recursion,
    },
)
