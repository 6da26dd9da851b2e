"""The per-block optimizer state: one typed definition of what ``optimizer.state[block.key]`` holds.

The two factors go by one naming (docs/algorithms.md §1): the input factor ``A`` and the output factor ``Γ``,
written ``G``. The keys below are also the checkpoint format, kept as they were, so state dicts saved by earlier
versions still load. Code builds keys with the helpers here rather than by hand, so that the order the
fused operations take their arguments in (output side first) is written down once.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor

GLOBAL = "global"
"""The key of the optimizer-wide state in ``optimizer.state`` (step count, previous lr, world size, optimizer class;
Q's recursion basis and device verdict)."""

INPUT, OUTPUT = "A", "G"
SIDES = (INPUT, OUTPUT)
JOINT = "_joint"
"""The suffix of the whitened local factors' decompositions (``curvature_sum="exact"``)."""


class BlockState(TypedDict, total=False):
    """The state of one block (a plain ``dict`` at run time; this class documents its keys and types).

    Factors: ``A``/``G`` (n_in × n_in, n_out × n_out), eigenvalues (n,), block-form matrices (n_out × n_in).

    * ``A``, ``G``: the local factors ``A_k``, ``Γ_k`` of the last statistics step (on a step where the block
      captured nothing, its averages).
    * ``A_ea``, ``G_ea``: the averages ``Ā``, ``Γ̄``; always current.
    * ``QA``, ``dA``, ``QG``, ``dG``: eigenvectors and clamped eigenvalues from the last inverse step: of the
      averages, or for Q and QE with ``inv_freq == 1`` of ``Â``, ``Γ̂``; stale between inverse steps by design.
      A block has curvature once ``QA`` exists.
    * ``QA_hat``, ``dA_hat``, ``QG_hat``, ``dG_hat``: Q's decompositions of ``Â``, ``Γ̂`` during an inverse step
      followed by steps without one (removed after that step).
    * ``QA_joint``, ``dA_joint``, ``QG_joint``, ``dG_joint``: with ``curvature_sum="exact"``, the eigendecompositions
      of the local factors whitened by their averages (:mod:`kldwrm_fast.curvature.joint`) during an inverse step
      (removed after that step).
    * ``momentum_buffer``: KFAC's heavy-ball buffer.
    * ``v_prev``: ``V_{k−1}`` (SO; Q's recursion).
    * ``g_hat``, ``m``: Q's ``Ĝ`` and ``M``; between Q's inverse steps with ``inv_freq > 1`` they (and ``v_prev``)
      are held in the eigenbasis of ``QG``, ``QA`` (``global_state["ghat_basis"] == "eigen"``).
    """

    A: Tensor
    G: Tensor
    A_ea: Tensor
    G_ea: Tensor
    QA: Tensor
    dA: Tensor
    QG: Tensor
    dG: Tensor
    QA_hat: Tensor
    dA_hat: Tensor
    QG_hat: Tensor
    dG_hat: Tensor
    QA_joint: Tensor
    dA_joint: Tensor
    QG_joint: Tensor
    dG_joint: Tensor
    momentum_buffer: Tensor
    v_prev: Tensor
    g_hat: Tensor
    m: Tensor


def store(state: dict, key: str, value: Tensor) -> None:
    """``state[key] = value``, written into the tensor already there when it has ``value``'s shape, dtype and device.

    Tensors a plain step reads keep their storage from step to step this way: a compiled plain step replayed
    as a CUDA graph (``compiled_step(mode="reduce-overhead")``) reads its state at fixed addresses, and a
    replaced tensor makes torch record the graph again, keeping every earlier recording. ``value`` must not
    overlap the tensor there unless it is that tensor."""
    store_all([state], key, [value])


def store_all(states: list[dict], key: str, values: list[Tensor]) -> None:
    """:func:`store` for aligned lists, the in-place writes in one multi-tensor copy."""
    targets, sources = [], []
    for state, value in zip(states, values, strict=True):
        old = state.get(key)
        if (
            isinstance(old, Tensor)
            and old.shape == value.shape
            and old.dtype == value.dtype
            and old.device == value.device
        ):
            targets.append(old)
            sources.append(value)
        else:
            state[key] = value
    if targets:
        torch._foreach_copy_(targets, sources)


def average_key(side: str) -> str:
    """The key of a side's average: ``"A_ea"`` or ``"G_ea"``."""
    return f"{side}_ea"


def eigen_keys(name: str) -> tuple[str, str]:
    """``(eigenvectors, eigenvalues)`` keys of a decomposition named ``name`` (``"A"``, ``"G"``, ``"A_hat"``, ...)."""
    return f"Q{name}", f"d{name}"


def has_curvature(state: dict) -> bool:
    """Whether the block has an eigendecomposition to precondition with."""
    return eigen_keys(INPUT)[0] in state


EIGEN_KEYS = (*eigen_keys(OUTPUT), *eigen_keys(INPUT))
"""``(q_g, d_g, q_a, d_a)``: the decomposition in the order the fused operations take it."""

HAT_EIGEN_KEYS = (*eigen_keys(OUTPUT + "_hat"), *eigen_keys(INPUT + "_hat"))
"""Q's decomposition of ``Γ̂``, ``Â`` in the same order."""

JOINT_EIGEN_KEYS = (*eigen_keys(OUTPUT + JOINT), *eigen_keys(INPUT + JOINT))
"""Q's exact mode: the whitened local factors' decompositions, output side first."""

AVERAGE_KEYS = (average_key(OUTPUT), average_key(INPUT))
"""``(ea_g, ea_a)``: the averages in the order ``q_precondition`` takes them."""

EIGENVECTOR_KEYS = (eigen_keys(OUTPUT)[0], eigen_keys(INPUT)[0])
"""``(q_g, q_a)``: the eigenvectors alone (rotations into and out of the eigenbasis)."""
