"""Validation of the optimizers' arguments: one ``ValueError`` line naming the argument and its accepted range."""

from __future__ import annotations

import math

from torch import nn

from kldwrm_fast.curvature.fisher import FISHER_TYPES, PREDICTIVES
from kldwrm_fast.ops import validate_backend


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_common(lr, rho, damping, weight_decay, stat_freq, inv_freq, fisher, predictive, backend) -> None:
    """Raise ``ValueError`` naming the first argument outside its accepted range."""
    _check(isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr), f"Invalid lr: {lr!r}; expected lr >= 0")
    _check(isinstance(rho, (int, float)) and 0 <= rho < 1, f"Invalid rho: {rho!r}; expected 0 <= rho < 1")
    _check(isinstance(damping, (int, float)) and damping >= 0, f"Invalid damping: {damping!r}; expected damping >= 0")
    _check(
        isinstance(weight_decay, (int, float)) and weight_decay >= 0,
        f"Invalid weight_decay: {weight_decay!r}; expected weight_decay >= 0",
    )
    _check(_is_int(stat_freq) and stat_freq >= 1, f"Invalid stat_freq: {stat_freq!r}; expected an integer >= 1")
    _check(
        _is_int(inv_freq) and inv_freq >= 1 and inv_freq % stat_freq == 0,
        f"Invalid inv_freq: {inv_freq!r}; expected a positive multiple of stat_freq={stat_freq}",
    )
    _check(fisher in FISHER_TYPES, f"Invalid fisher: {fisher!r}; expected one of {FISHER_TYPES}")
    _check(predictive in PREDICTIVES, f"Invalid predictive: {predictive!r}; expected one of {PREDICTIVES}")
    validate_backend(backend)


BIAS_MODES = ("folded", "separate")
REPEATED_CALLS = ("expand", "reduce")


def validate_structure(bias, eigenvalue_floor, repeated_calls="expand") -> None:
    """The options that shape the blocks and their decompositions (docs/algorithms.md §1, §6.4)."""
    _check(bias in BIAS_MODES, f"Invalid bias: {bias!r}; expected one of {BIAS_MODES}")
    _check(
        repeated_calls in REPEATED_CALLS,
        f"Invalid repeated_calls: {repeated_calls!r}; expected one of {REPEATED_CALLS}",
    )
    _check(
        isinstance(eigenvalue_floor, (int, float)) and 0 <= eigenvalue_floor < math.inf,
        f"Invalid eigenvalue_floor: {eigenvalue_floor!r}; expected eigenvalue_floor >= 0",
    )


def validate_positive_or_none(name: str, value) -> None:
    """A clip threshold: a positive finite number, or None to disable clipping."""
    _check(
        value is None or (isinstance(value, (int, float)) and 0 < value < math.inf),
        f"Invalid {name}: {value!r}; expected {name} > 0 or None",
    )


CURVATURE_SUMS = ("reweighted", "exact")


def validate_curvature_sum(curvature_sum) -> None:
    """Q and QE: how the two-term Kronecker sum of eq. (81) is inverted (docs/algorithms.md §3)."""
    _check(
        curvature_sum in CURVATURE_SUMS,
        f"Invalid curvature_sum: {curvature_sum!r}; expected one of {CURVATURE_SUMS}",
    )


def validate_routing(model, predictive_module, others, others_kwargs) -> None:
    """``predictive_module`` (an ``nn.Module`` that contains the model) and ``others`` (a callable, with
    ``others_kwargs`` only beside it); the optimizer a callable builds is checked when it is built."""
    if predictive_module is not None:
        _check(
            isinstance(predictive_module, nn.Module) and isinstance(model, nn.Module)
            and any(module is model for module in predictive_module.modules()),
            f"Invalid predictive_module: {type(predictive_module).__name__}; expected the nn.Module whose output "
            f"the loss reads, containing the model the optimizer is built from ({type(model).__name__})",
        )  # fmt: skip
    _check(
        others is None or callable(others),
        f"Invalid others: {others!r}; expected a torch.optim.Optimizer class (e.g. torch.optim.AdamW) or None",
    )
    _check(
        others_kwargs is None or others is not None,
        "Invalid others_kwargs: given without others; pass others=torch.optim.AdamW (say) with it",
    )
