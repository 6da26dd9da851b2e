"""The race's optimizers and their declared grids (bench/race.py).

Ours (KFAC, SO, Q, QE) are searched coordinate by coordinate on seed 0: the learning rate at damping 0.01 and a
10/10 cadence, then the damping at the best learning rate, then a cheaper cadence (``stat_freq``/``inv_freq`` 50/50)
at both; QE, whose step costs several of Q's (its inner minimisation), over the learning rate only.
Every other optimizer is searched over its learning rate only, with its package's documented defaults for the
rest: ``torch.optim.AdamW``, ``torch.optim.SGD`` (momentum 0.9, Nesterov), heavyball's ``SOAP``, ``PSGDKron`` and
``KLShampoo`` (its Shampoo-family optimizer; heavyball 3 has no plain Shampoo), and ``kldwrm_fast.baselines``'
reference K-FAC (paper-style code: Linear and Conv2d layers only, so it runs on the paper CNN and the MLP).

heavyball compiles its steps with ``torch.compile``; ``compile_heavyball`` decides whether it may (its compile time
is reported apart). When heavyball is not installed its rows say so (``pip install -e ".[race]"``).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
from torch import nn

from kldwrm_fast import KFAC, QEKLDWRM, QKLDWRM, SOKLDWRM
from kldwrm_fast.baselines import ReferenceKFAC

WARM = {
    "kfac-warm": functools.partial(KFAC, eigensolver="warm"),
    "kfac-warm0": functools.partial(KFAC, eigensolver="warm", warm_iters=0),
    "kfac-factored": functools.partial(KFAC, damping_form="factored"),
    "kfac-factored-warm0": functools.partial(KFAC, damping_form="factored", eigensolver="warm", warm_iters=0),
    "kfac-rank64": functools.partial(KFAC, rank=64),
    "kfac-rank16": functools.partial(KFAC, rank=16),
}
"""K-FAC with warm-started eigenbases (docs/algorithms.md §6.5), factored damping (§6.6) or low-rank sides (§6.7):
raced on request
(``--optimizers``), not by default."""
OURS = {"kfac": KFAC, "so": SOKLDWRM, "q": QKLDWRM, "qe": QEKLDWRM, **WARM}
HEAVYBALL = {"soap": "SOAP", "psgd-kron": "PSGDKron", "shampoo": "KLShampoo"}
LABELS = {"kfac": "KFAC (ours)", "so": "SO (ours)", "q": "Q (ours)", "qe": "QE (ours)", "adamw": "AdamW",
          "sgd": "SGD-Nesterov", "soap": "SOAP (heavyball)", "psgd-kron": "PSGD-Kron (heavyball)",
          "shampoo": "KL-Shampoo (heavyball)", "reference-kfac": "reference K-FAC",
          "kfac-warm": "KFAC warm (ours)", "kfac-warm0": "KFAC warm, 0 iterations (ours)",
          "kfac-factored": "KFAC factored damping (ours)",
          "kfac-factored-warm0": "KFAC factored damping, warm 0 iterations (ours)",
          "kfac-rank64": "KFAC rank 64 (ours)", "kfac-rank16": "KFAC rank 16 (ours)"}  # fmt: skip
NAMES = [name for name in LABELS if name not in WARM]
"""The optimizers raced by default."""

OUR_BASE = dict(damping=0.01, stat_freq=10, inv_freq=10)
GRIDS = {
    "ours": {"lr": [0.01, 0.03, 0.1], "damping": [0.001, 0.1], "cadence": [(50, 50)]},
    "qe": {"lr": [0.01, 0.03, 0.1], "damping": [], "cadence": []},
    "adamw": {"lr": [1e-3, 3e-3, 1e-2]},
    "sgd": {"lr": [0.01, 0.03, 0.1]},
    "soap": {"lr": [1e-3, 3e-3, 1e-2]},
    "psgd-kron": {"lr": [3e-4, 1e-3, 3e-3]},
    "shampoo": {"lr": [1e-3, 3e-3, 1e-2]},
    "reference-kfac": {"lr": [0.01, 0.03, 0.1]},
}
_COMPILE_MODE: dict = {}  # heavyball's own compile mode, kept for runs in one process that switch it back on


def grid(name: str) -> dict:
    return GRIDS[name if name in GRIDS else "ours"]


def base_settings(name: str, lr: float) -> dict:
    return {**OUR_BASE, "lr": lr} if name in OURS else {"lr": lr}


def not_applicable(name: str, model: nn.Module):
    """Why ``name`` cannot run on ``model`` (a line), or None."""
    if name in HEAVYBALL and importlib.util.find_spec("heavyball") is None:
        return 'missing: heavyball is not installed (pip install -e ".[race]")'
    if name == "reference-kfac":
        layers = (nn.Linear, nn.Conv2d)
        covered = {id(p) for m in model.modules() if isinstance(m, layers) for p in m.parameters(recurse=False)}
        left = [n for n, p in model.named_parameters() if id(p) not in covered]
        attention = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
        if left or attention:
            return ("not applicable: the reference K-FAC trains Linear and Conv2d layers by their hooks only; "
                    f"{len(left)} parameter tensors would stay untrained"
                    + (", and attention's projections never call their modules" if attention else ""))  # fmt: skip
    return None


def make(name: str, model: nn.Module, settings: dict, compile_heavyball: bool):
    """The optimizer ``name`` over ``model``'s parameters with ``settings`` (lr, and for ours damping/cadence)."""
    if name in OURS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the construction notes (e.g. Q's step cap) are the documented ones
            return OURS[name](model, **settings)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **settings)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), momentum=0.9, nesterov=True, **settings)
    if name == "reference-kfac":
        return ReferenceKFAC(model, **settings)
    if name in HEAVYBALL:
        import heavyball
        import heavyball.utils

        _COMPILE_MODE.setdefault("default", heavyball.utils.compile_mode)
        heavyball.utils.compile_mode = _COMPILE_MODE["default"] if compile_heavyball else None
        return getattr(heavyball, HEAVYBALL[name])(model.parameters(), **settings)
    raise ValueError(f"optimizer must be one of {', '.join(NAMES)}; got {name!r}")
