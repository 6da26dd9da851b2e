"""Statistics and eigendecompositions due at a step, for one process or many (docs/algorithms.md §2, §6).

:class:`CurvatureRefresh` is a mixin of :class:`~kldwrm_fast.optim.base.CurvatureOptimizer`: it reads the
optimizer's ``curvature``, ``fisher``, ``data_parallel``, ``pack_statistics``, ``_ops`` and per-block state.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kldwrm_fast import distributed
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.eigen import decompose_many
from kldwrm_fast.ops import reference


@dataclass
class StepInfo:
    """What one step knows besides the gradients: lr, cadence, a loss scaler's ``1/scale``, and the blocks it
    preconditions (``indices`` into ``curvature.blocks``, grouped for batched calls by ``batches``)."""

    lr: float
    stats_due: bool
    inverse_due: bool
    grad_unscale: Optional[Tensor]
    indices: tuple[int, ...]
    batches: BlockBatches


class CurvatureRefresh:
    """Folds new statistics into the averages and decomposes the factors due (see the module docstring)."""

    def _refresh_curvature(self, group: dict, blocks, info: StepInfo, reweight: Optional[float]):
        """Statistics and eigendecompositions due at this step.

        With ``reweight = c_k`` the decomposed factors are ``Â, Γ̂`` (Q, QE); without, ``Ā, Γ̄`` (KFAC, SO).
        """
        if not info.stats_due:
            return
        empirical = self.fisher == "empirical"
        factor = float(self.curvature.forward_passes()) if empirical else 1.0
        unscale = info.grad_unscale if empirical else None
        if self.data_parallel.active:
            self._refresh_curvature_distributed(group, blocks, info, reweight, factor, unscale)
            return
        factors = []
        for block in blocks:
            state = self.block_state(block)
            reweight_now = reweight if info.inverse_due else None
            if block.has_statistics():
                hats = block.update_statistics(state, self._ops, group["rho"], reweight_now, factor, unscale)
            else:
                hats = block.repeat_statistics(state, group["rho"], reweight_now)
            factors += self._decomposition_targets(block, state, hats)
        if info.inverse_due:
            requests = [self._eigen_request(block, key, matrix) for block, key, matrix in factors]
            failed: list[int] = []
            for (block, key, _), result in zip(factors, decompose_many(requests, self._ops.eigh, failed)):
                self.block_state(block)[f"Q{key}"], self.block_state(block)[f"d{key}"] = result
            self._restart_non_finite_averages({factors[i][0] for i in failed})
            info.batches.compact([self.block_state(block) for block in blocks])

    def _restart_non_finite_averages(self, blocks) -> None:
        """Zero the averages that overflowed (found only where a decomposition failed: no sync otherwise), so that
        they grow again from the next statistics instead of staying infinite for good."""
        for block in blocks:
            state = self.block_state(block)
            for key in ("A_ea", "G_ea"):
                if not torch.isfinite(state[key]).all():
                    state[key].zero_()
                    warnings.warn(
                        f"{type(self).__name__}: the {'input' if key[0] == 'A' else 'output'} factor average of "
                        f"{block.name} overflowed; it restarts from zero with the next statistics",
                        RuntimeWarning,
                        stacklevel=5,
                    )

    def _decomposition_targets(self, block, state: dict, hats) -> list[tuple]:
        """``(block, key, matrix)`` per factor to decompose on an inverse step, stored as ``Q{key}``, ``d{key}``.

        KFAC, SO: the averages under ``"A"``, ``"G"``. Q, QE (``hats`` given): the reweighted factors, under
        ``"A"``/``"G"`` when every step is an inverse step, else under ``"A_hat"``/``"G_hat"`` (this step only)
        beside the averages under ``"A"``/``"G"`` for the steps that follow (docs/algorithms.md §2, eq. (20)).
        """
        averages = [(block, "A", state["A_ea"]), (block, "G", state["G_ea"])]
        if hats is None:
            return averages
        if not self.steps_without_inverse():
            return [(block, "A", hats[0]), (block, "G", hats[1])]
        return [(block, "A_hat", hats[0]), (block, "G_hat", hats[1])] + averages

    def steps_without_inverse(self) -> bool:
        """Whether steps without an eigendecomposition follow an inverse step (``inv_freq > 1``)."""
        return self.param_groups[0]["inv_freq"] > 1

    def _eigen_request(self, block, key: str, matrix: Tensor) -> tuple:
        """``(matrix, previous decomposition or None, name)`` for the eigendecomposition of one factor."""
        state = self.block_state(block)
        side = key[0]
        previous = next(((state[f"Q{k}"], state[f"d{k}"]) for k in (key, side) if f"Q{k}" in state), None)
        kind = f"{'reweighted ' if key.endswith('_hat') else ''}{'input' if side == 'A' else 'output'}"
        return matrix, previous, f"{kind} factor of {block.name}"

    def _refresh_curvature_distributed(self, group, blocks, info, reweight, factor, unscale) -> None:
        """As :meth:`_refresh_curvature`, with local factors averaged over ranks and eigendecompositions
        shared out by cost (each factor decomposed by one rank and broadcast)."""
        locals_ = []
        for block in blocks:
            if not block.has_statistics():  # its averages stand in (Note [which blocks take part])
                state = self.block_state(block)
                locals_ += [(block, side, state[f"{side}_ea"].clone()) for side in ("A", "G")]
                continue
            for side, (rows, scale) in block.statistics_rows(factor, unscale).items():
                locals_.append((block, side, reference.gram(rows, scale, block.dtype)))
        distributed.average_symmetric_([local for _, _, local in locals_], pack=self.pack_statistics)
        reweighted: dict = {}  # block -> {side: X̂ or None}
        for block, side, local in locals_:
            state = self.block_state(block)
            reweighted.setdefault(block, {})[side] = block.fold_local(
                state, side, local, group["rho"], reweight if info.inverse_due else None
            )
        if info.inverse_due:
            factors = []
            for block in blocks:
                state = self.block_state(block)
                hats = block.reweighted_pair(state, reweighted[block]) if reweight is not None else None
                factors += self._decomposition_targets(block, state, hats)
            self._decompose_distributed(factors)

    def _decompose_distributed(self, factors: list) -> None:
        owners = distributed.assign_by_cost(
            [matrix.shape[0] for _, _, matrix in factors], self.data_parallel.world_size
        )
        rank = self.data_parallel.rank
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        # This rank's share in one grouped call (batched solver, one host check), as on a single process.
        decomposed = dict(zip(mine, decompose_many([self._eigen_request(*factors[i]) for i in mine], self._ops.eigh)))
        for index, ((block, key, matrix), owner) in enumerate(zip(factors, owners)):
            state = self.block_state(block)
            keys = (f"Q{key}", f"d{key}")
            if owner == rank:
                vectors, values = decomposed[index]
            else:
                vectors, values = torch.empty_like(matrix), matrix.new_empty(matrix.shape[0])
            vectors, values = vectors.contiguous().clone(), values.contiguous().clone()
            torch.distributed.broadcast(vectors, src=owner)
            torch.distributed.broadcast(values, src=owner)
            state[keys[0]], state[keys[1]] = vectors, values
