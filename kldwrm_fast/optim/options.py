"""The options of each rule, as one dataclass per rule: every field is a param-group entry (so ``state_dict``
carries it) and is validated here, once, with one ``ValueError`` line naming the argument and its accepted range.

The constructors keep their explicit signatures (their defaults are pinned by SPEC); each builds its dataclass,
whose ``__post_init__`` validates every field, and hands it to the base class, which records
:meth:`Options.defaults` in every param group. Options a user sets on the optimizer after construction
(``opt.check_numerics = False``) go through :func:`group_option`, which validates them the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Optional

from torch import nn

from kldwrm_fast.curvature.factored import DAMPING_FORMS
from kldwrm_fast.curvature.fisher import FISHER_TYPES, PREDICTIVES
from kldwrm_fast.curvature.warm import EIGENSOLVERS
from kldwrm_fast.ops import BACKENDS

BIAS_MODES = ("folded", "separate")
REPEATED_CALLS = ("expand", "reduce")
MAX_FACTOR_DIM = 4096
"""The default ``max_factor_dim`` (docs/algorithms.md §1, "diagonal sides"): a dense side of n = 4096 holds about four
n × n float32 matrices in the state (local factor, average, eigenvectors; Q's reweighted ones on an inverse step),
256 MiB, and one eigendecomposition of O(n³) ≈ 7·10¹⁰ multiply-adds per inverse step; at 8192 that is 1 GiB and 8×
the arithmetic per side, at 32,000 (a vocabulary) 16 GiB and an eigensolve of minutes."""
WARM_TOL = 0.1
"""The default ``warm_tol`` (docs/algorithms.md §6.5): a warm basis is kept while the factor it decomposes exactly is
within 10% (relative Frobenius distance) of the true one."""
FULL_EVERY = 10
"""The default ``full_every``: every tenth refresh decomposes exactly, whatever the residuals say."""
WEIGHT_SHARING = ("expand", "reduce")
CURVATURE_SUMS = ("reweighted", "exact")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float))


def _positive_or_none(value) -> bool:
    return value is None or (_number(value) and 0 < value < math.inf)


_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "lr": (lambda v: _number(v) and v >= 0 and math.isfinite(v), "lr >= 0"),
    "rho": (lambda v: _number(v) and 0 <= v < 1, "0 <= rho < 1"),
    "damping": (lambda v: _number(v) and v >= 0, "damping >= 0"),
    "weight_decay": (lambda v: _number(v) and v >= 0, "weight_decay >= 0"),
    "stat_freq": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "eigenvalue_floor": (lambda v: _number(v) and 0 <= v < math.inf, "eigenvalue_floor >= 0"),
    "fisher": (lambda v: v in FISHER_TYPES, f"one of {FISHER_TYPES}"),
    "predictive": (lambda v: v in PREDICTIVES, f"one of {PREDICTIVES}"),
    "backend": (lambda v: v in BACKENDS, f"one of {', '.join(map(repr, BACKENDS))}"),
    "bias": (lambda v: v in BIAS_MODES, f"one of {BIAS_MODES}"),
    "repeated_calls": (lambda v: v in REPEATED_CALLS, f"one of {REPEATED_CALLS}"),
    "weight_sharing": (lambda v: v in WEIGHT_SHARING, f"one of {WEIGHT_SHARING}"),
    "max_factor_dim": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or None"),
    "eigensolver": (lambda v: v in EIGENSOLVERS, f"one of {EIGENSOLVERS}"),
    "warm_iters": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "warm_tol": (lambda v: _number(v) and 0 <= v < math.inf, "0 <= warm_tol < inf"),
    "full_every": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or None"),
    "damping_form": (lambda v: v in DAMPING_FORMS, f"one of {DAMPING_FORMS}"),
    "rank": (lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1 or None"),
    "check_numerics": (lambda v: isinstance(v, bool), "True or False"),
    "pack_statistics": (lambda v: isinstance(v, bool), "True or False"),
    "momentum": (lambda v: _number(v) and 0 <= v < 1, "0 <= momentum < 1"),
    "kl_clip": (_positive_or_none, "kl_clip > 0 or None"),
    "clip": (_positive_or_none, "clip > 0 or None"),
    "max_step_rms": (_positive_or_none, "max_step_rms > 0 or None"),
    "ghat_growth_limit": (_positive_or_none, "ghat_growth_limit > 0 or None"),
    "curvature_sum": (lambda v: v in CURVATURE_SUMS, f"one of {CURVATURE_SUMS}"),
    "exact_damping_iterations": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "n_inner": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "inner_lr_ratio": (lambda v: _number(v) and v > 0, "inner_lr_ratio > 0"),
    "n_cap": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "kl_scale": (lambda v: _number(v) and v >= 0, "kl_scale >= 0"),
}
"""Per option: whether a value is accepted, and the accepted range as the error names it."""


def check_option(name: str, value, context: Mapping) -> None:
    """Raise ``ValueError`` (one line) unless ``value`` is accepted for option ``name``; ``context`` holds the other
    options (``inv_freq`` is checked against ``stat_freq``)."""
    if name == "inv_freq":
        stat_freq = context["stat_freq"]
        accepted = _is_int(value) and value >= 1 and value % stat_freq == 0
        _check(accepted, f"Invalid inv_freq: {value!r}; expected a positive multiple of stat_freq={stat_freq}")
        return
    accepts, expected = _RULES[name]
    _check(accepts(value), f"Invalid {name}: {value!r}; expected {expected}")
    if name == "rank" and value is not None:
        _check(
            context.get("damping_form", "eigen") == "eigen",
            f"Invalid rank: {value!r} with damping_form={context.get('damping_form')!r}; low-rank sides take the "
            "eigenvalue damping (damping_form='eigen') or rank=None",
        )


@dataclass(kw_only=True)
class Options:
    """The options every rule has (docs/algorithms.md §3–§6); see :class:`~kldwrm_fast.KFAC` for their meaning.

    ``check_numerics``: the numerical-fault checks (Note [numerics on the device] in
    :mod:`kldwrm_fast.optim.numerics`). ``pack_statistics``: under data parallelism, all-reduce only the upper
    triangles of the symmetric factors."""

    lr: float
    rho: float
    damping: float
    weight_decay: float
    stat_freq: int
    inv_freq: int
    fisher: str
    predictive: str
    backend: str
    bias: str
    eigenvalue_floor: float
    repeated_calls: str
    weight_sharing: str = "expand"
    max_factor_dim: Optional[int] = MAX_FACTOR_DIM
    eigensolver: str = "exact"
    warm_iters: int = 1
    warm_tol: float = WARM_TOL
    full_every: Optional[int] = FULL_EVERY
    check_numerics: bool = True
    pack_statistics: bool = True

    def __post_init__(self) -> None:
        values = asdict(self)
        for field in fields(self):
            check_option(field.name, values[field.name], values)

    def defaults(self) -> dict:
        """The param-group entries: every field."""
        return asdict(self)


@dataclass(kw_only=True)
class KFACOptions(Options):
    momentum: float
    kl_clip: Optional[float]
    damping_form: str = "eigen"
    rank: Optional[int] = None


@dataclass(kw_only=True)
class SOOptions(Options):
    kl_clip: Optional[float]
    damping_form: str = "eigen"
    rank: Optional[int] = None


@dataclass(kw_only=True)
class QOptions(Options):
    """Q's options: ``ghat_growth_limit`` (the growth guard) and ``exact_damping_iterations``
    (``curvature_sum="exact"``) are described on :class:`~kldwrm_fast.QKLDWRM`."""

    clip: Optional[float]
    kl_clip: Optional[float]
    curvature_sum: str
    max_step_rms: Optional[float]
    ghat_growth_limit: Optional[float] = 100.0
    exact_damping_iterations: int = 50


@dataclass(kw_only=True)
class QEOptions(QOptions):
    n_inner: int
    inner_lr_ratio: float
    n_cap: int
    kl_scale: float


def group_option(name: str, doc: str) -> property:
    """An option read from the optimizer's first param group and, when set on the optimizer, validated and written
    into every param group of its own (not those of a routed optimizer: ``others=``)."""

    def get(self):
        return self.param_groups[0][name]

    def set_(self, value) -> None:
        check_option(name, value, self.param_groups[0])
        for group in self.own_groups():
            group[name] = value

    return property(get, set_, doc=doc)


def check_lr(lr) -> None:
    """The lr a step reads from its param group (a scheduler may have set it)."""
    _check(_RULES["lr"][0](lr), f"Invalid lr: {lr!r}; expected lr >= 0 (set by a scheduler?)")


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
