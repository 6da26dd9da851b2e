"""Batched preconditioning: blocks of equal shape, dtype and device share one op call (docs/algorithms.md §6.2).

Per-block state tensors that a batched call reads (eigendecompositions, averages) are re-bound to views of
one stacked tensor, so later steps pass the stacked tensor without copying. A group is restacked (one copy)
only when some member's tensor was replaced, i.e. after an inverse step or ``load_state_dict``; in-place
updates of the averages write through the views. A block alone in its group goes to a backend that takes
unbatched blocks as it is: on the host-bound paths (small models, CPU) the batch-of-one views and batched
matmuls cost more than the arithmetic. With the PyTorch reference, preconditioning goes block by block
(:meth:`BlockBatches.precondition`), bit for bit what the batched call gives. Blocks with a diagonal side (Note
[diagonal sides] in :mod:`kldwrm_fast.ops.reference`) form groups of their own, which run the PyTorch reference on
every backend: the fused kernels take dense factors only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.curvature.state import EIGEN_KEYS, EIGENVECTOR_KEYS
from kldwrm_fast.ops import Operations, operations, reference


def _stacks(base: Tensor, members: list[Tensor]) -> bool:
    """Whether ``base[j]`` *is* ``members[j]`` for every j: same storage, and each member's sizes, strides and
    storage offset those of ``base[j]``. Sharing a storage is not enough: a solver may return its vectors as a
    transposed view of a buffer, whose ``_base`` then holds every matrix transposed."""
    if base.dim() != members[0].dim() + 1 or base.shape[0] != len(members):
        return False
    storage = base.untyped_storage().data_ptr()
    return all(
        m.untyped_storage().data_ptr() == storage
        and m.shape == base.shape[1:]
        and m.stride() == base.stride()[1:]
        and m.storage_offset() == base.storage_offset() + j * base.stride(0)
        for j, m in enumerate(members)
    )


class BlockBatches:
    """Groups of block indices with equal ``(shape, diagonal sides, dtype, device)``, in first-appearance order."""

    def __init__(self, blocks: list[FactoredBlock]) -> None:
        groups: dict[tuple, list[int]] = {}
        for index, block in enumerate(blocks):
            key = (block.shape, block.diagonal, block.key.dtype, block.key.device)
            groups.setdefault(key, []).append(index)
        self.groups = list(groups.values())
        # Kept per block, read by a group's first index: a traced (compiled) step cannot look a list up by ``id``.
        self._diagonal = [block.diagonal for block in blocks]
        self._eigenvalue_terms: dict[int, list] = {}  # see eigenvalue_terms

    def _shared(self, group: list[int], states: list[dict], key: str) -> Tensor:
        """The (len(group), ...) tensor whose views are ``states[i][key]``; restacked when a member changed."""
        members = [states[i][key] for i in group]
        if len(group) == 1:
            return members[0].unsqueeze(0)
        base = members[0]._base
        if base is not None and _stacks(base, members):
            return base
        stacked = torch.stack(members)
        for i, view in zip(group, stacked.unbind(0)):
            states[i][key] = view
        return stacked

    def compact(self, states: list[dict], keys: tuple = EIGEN_KEYS) -> None:
        """Re-bind ``keys`` after an inverse step so that no state tensor keeps a larger one alive.

        The eigensolver groups factors by size, not blocks by shape, so a block's eigenvectors can be a view
        of a stack that other groups no longer use: members of a batch group become views of their own
        stack, and a lone block's view gets its own storage.
        """
        for group in self.groups:
            for key in keys:
                if len(group) > 1:
                    self._shared(group, states, key)
                    continue
                tensor = states[group[0]][key]
                if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
                    states[group[0]][key] = tensor.clone()

    def _run(self, ops: Operations, group, states, keys, per_block: list[Tensor]):
        """``(shared state tensors, stacked per-block tensors, per-member results of an output)``."""
        if len(group) == 1 and ops.takes_unbatched:
            (index,) = group
            return [states[index][key] for key in keys], per_block[index], lambda result: [result]
        shared = [self._shared(group, states, key) for key in keys]
        batch = per_block[group[0]].unsqueeze(0) if len(group) == 1 else torch.stack([per_block[i] for i in group])
        return shared, batch, lambda result: result.unbind(0)

    def per_group(self, ops: Operations, states, keys: tuple, per_block: list[Tensor], compute) -> list[list]:
        """``compute(group_ops, group, *shared state tensors of keys, stacked per_block)`` for each group, with
        ``group_ops`` ``ops``, or the PyTorch reference for a group with a diagonal side; its outputs (a tensor or a
        tuple of tensors) handed back per block: one list per output, aligned with the blocks."""
        outputs: list = []
        for group in self.groups:
            group_ops = operations("torch") if self._diagonal[group[0]] else ops
            shared, batch, members = self._run(group_ops, group, states, keys, per_block)
            results = compute(group_ops, group, *shared, batch)
            results = results if isinstance(results, tuple) else (results,)
            if not outputs:
                outputs = [[None] * len(per_block) for _ in results]
            for out, result in zip(outputs, results):
                for i, block_result in zip(group, members(result)):
                    out[i] = block_result
        return outputs

    def precondition(self, ops: Operations, states: list[dict], vs: list[Tensor], damping: float) -> list[Tensor]:
        """``P(V)`` for every block with its cached eigendecomposition.

        Where calls run the PyTorch reference eagerly (``ops.reference_now``), block by block, with each
        block's denominator ``d_Γ d_Aᵀ + δ`` kept from call to call (:meth:`eigenvalue_terms`): a plain step is
        host-bound there, and the denominator's four operations per block (two of them views) and the batching's
        bookkeeping cost more than the GEMMs on a small model (the paper CNN's four blocks: 235–240 → 140 µs on the
        2-core development CPU). The result is the reference's, bit for bit: the same operations on the same
        values, made at another time."""
        if ops.reference_now:
            q_g, q_a = EIGENVECTOR_KEYS
            denominators = [self.eigenvalue_terms(i, state, 1.0, damping, False)[1] for i, state in enumerate(states)]
            return [
                reference.divided_precondition(state[q_g], state[q_a], denominator, v)
                for state, denominator, v in zip(states, denominators, vs, strict=True)
            ]
        (out,) = self.per_group(ops, states, EIGEN_KEYS, vs, lambda run, _, *args: run.precondition(*args, damping))
        return out

    def eigenvalue_terms(
        self, index: int, state: dict, scale: float, damping: float, keep_products: bool = True
    ) -> tuple[Optional[Tensor], Tensor]:
        """``(d_Γ d_Aᵀ, scale · d_Γ d_Aᵀ + δ)`` (n_out, n_in) of block ``index`` (:func:`reference.damped`), made
        again only when its eigenvalues, ``scale`` or ``damping`` changed; callers must not write them. Without
        ``keep_products`` only the denominator is kept (one parameter-sized tensor per block, not two) and the
        products are returned as None. The cache holds the eigenvalue tensors they were made from, with their
        version counters (bumped by every in-place write, an inverse step's included). Eigenvalues made under
        ``torch.inference_mode`` have no version counter and are not cached."""
        d_g, d_a = state[EIGEN_KEYS[1]], state[EIGEN_KEYS[3]]
        if d_g.is_inference() or d_a.is_inference():
            products = reference.eigenvalue_products(d_g, d_a)
            return products, reference.damped(products, scale, damping)
        versions = (d_g._version, d_a._version)
        cached = self._eigenvalue_terms.get(index)
        if cached is None or cached[0] is not d_g or cached[1] is not d_a or cached[2] != versions:
            cached = [d_g, d_a, versions, None, {}]
            self._eigenvalue_terms[index] = cached
        denominators = cached[4]
        if (scale, damping) not in denominators or (keep_products and cached[3] is None):
            products = reference.eigenvalue_products(d_g, d_a) if cached[3] is None else cached[3]
            if keep_products:
                cached[3] = products
            denominators.clear()  # one is kept: a schedule of lr or damping makes a new one per step
            denominators[scale, damping] = reference.damped(products, scale, damping)
        return cached[3], denominators[scale, damping]

    def rotate(self, ops: Operations, states: list[dict], vs: list[Tensor], inverse: bool = False) -> list[Tensor]:
        """``Q_Γᵀ V Q_A`` per block with its cached eigenvectors (``inverse``: ``Q_Γ V Q_Aᵀ``)."""
        rotation = reference.unrotate if inverse else reference.rotate
        (out,) = self.per_group(ops, states, EIGENVECTOR_KEYS, vs, lambda _, __, *args: rotation(*args))
        return out
