"""The contents checks a checkpoint passes before :meth:`~kldwrm_fast.optim.checkpoint.Checkpointing.load_state_dict`
changes anything: its structure, and per block the keys that only exist together, finite values and the block's
state dtype. Each failure is one ``ValueError`` line naming the layer and the key (docs/guide.md, "Checkpoints").

A torn write or a hand edit shows up here as a missing half of a pair (an eigenbasis without its eigenvalues), a
NaN, or a dtype the optimizer would never have written; shapes are checked separately against the layer
(:meth:`~kldwrm_fast.optim.checkpoint.Checkpointing._check_saved_shapes`).
"""

from __future__ import annotations

from torch import Tensor

from kldwrm_fast.curvature.lowrank import tail_key
from kldwrm_fast.curvature.state import GLOBAL, INPUT, OUTPUT, average_key, eigen_keys

_DECOMPOSED = (INPUT, OUTPUT, f"{INPUT}_hat", f"{OUTPUT}_hat")
"""The names whose decompositions are saved as an eigenbasis and its eigenvalues (``Q…`` and ``d…``)."""
_TOGETHER = (("A_ea", "G_ea"), ("A_inv", "G_inv", "inverse_damping"))
"""Keys written together: both averages; factored damping's two inverses and the δ they were made with."""


def check_structure(state_dict) -> None:
    """Raise unless ``state_dict`` is a dict with ``state`` (a dict) and ``param_groups`` (dicts with ``params``; their
    number and sizes are ``torch.optim``'s check, after the options a checkpoint must share)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"Invalid state_dict: a {type(state_dict).__name__}; expected the dict state_dict() returns")
    for key, kind in (("state", dict), ("param_groups", list)):
        if not isinstance(state_dict.get(key), kind):
            raise ValueError(f"Invalid state_dict: {key!r} is missing or not a {kind.__name__}; expected the dict "
                             "state_dict() returns")  # fmt: skip
    if not all(isinstance(group, dict) and "params" in group for group in state_dict["param_groups"]):
        raise ValueError("Invalid state_dict: a param group without 'params'; expected the dict state_dict() returns")


def check_block_state(name: str, saved: dict, dtype) -> None:
    """Raise when the saved state of the block of layer ``name`` lacks half of a pair, holds a non-finite factor,
    average or decomposition, or a floating tensor not of the block's state ``dtype``."""
    for key, value in saved.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        if value.dtype != dtype:
            raise ValueError(f"Invalid state_dict: {key!r} of layer {name!r} is {value.dtype}; the layer's state is "
                             f"{dtype} (from its parameters); resume with the model in its saved dtype")  # fmt: skip
        if _is_curvature(key) and not bool(value.isfinite().all()):
            raise ValueError(f"Invalid state_dict: {key!r} of layer {name!r} holds non-finite values; the optimizer "
                             "never saves them (an edited or corrupted checkpoint?)")  # fmt: skip
    for keys in [eigen_keys(n) for n in _DECOMPOSED] + list(_TOGETHER):
        present = [k for k in keys if k in saved]
        if present and len(present) < len(keys):
            _missing(name, next(k for k in keys if k not in saved), present[0])
    for side in (INPUT, OUTPUT):  # a low-rank side's tail needs its basis, a decomposition the average it came from
        for needed, by in ((eigen_keys(side)[0], tail_key(side)), (average_key(side), eigen_keys(side)[0])):
            if by in saved and needed not in saved:
                _missing(name, needed, by)


def _is_curvature(key: str) -> bool:
    """Factors, averages, decompositions and cached inverses: never saved non-finite (an overflowed average restarts
    at the decomposition that finds it). Recursion buffers may be: a plain step rejected on the device leaves Q's Ĝ
    as it came out, and the next step's growth guard restarts it (Note [numerics on the device] in
    :mod:`kldwrm_fast.optim.numerics`)."""
    decomposition = key[:1] in ("Q", "d", "t") and key[1:] in _DECOMPOSED  # a basis, its eigenvalues, a tail
    return key in (INPUT, OUTPUT) or key.endswith(("_ea", "_inv")) or decomposition


def check_global(saved_state: dict, has_blocks: bool) -> None:
    """Raise when block states are saved without the step counter that schedules them."""
    step = saved_state.get(GLOBAL, {}).get("step")
    if has_blocks and not (isinstance(step, int) and step >= 0):
        raise ValueError(f"Invalid state_dict: the global 'step' is {step!r}; expected an integer >= 0 beside saved "
                         "block states (a torn or edited checkpoint?)")  # fmt: skip


def _missing(name: str, absent: str, present: str) -> None:
    raise ValueError(f"Invalid state_dict: layer {name!r} has {present!r} but no {absent!r}; they are saved together "
                     "(a torn or edited checkpoint?)")  # fmt: skip
