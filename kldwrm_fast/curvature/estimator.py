"""The curvature estimator: what is due at step k, and the refresh of statistics and eigendecompositions for one
process or many (docs/algorithms.md §2, §6).

The optimizers hold the step rules; this object holds everything about the curvature they precondition with:
the cadence (read from one source, the optimizer's first param group, by the capture hooks and by ``step()``
alike), which blocks without curvature join on an inverse step (agreed over ranks), folding new statistics into
the averages, and the grouped eigendecompositions with their fallback ladder. Both the single-process and the
data-parallel path compute local factors with the dispatched fused ``factor_update``.

Per-block state lives in the optimizer's ``state`` (so ``state_dict`` carries it); ``state_of(block)`` returns it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from kldwrm_fast import distributed
from kldwrm_fast.curvature.base import Curvature
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.curvature.eigen import decompose_many
from kldwrm_fast.curvature.joint import damping_split, whitened_local
from kldwrm_fast.curvature.state import INPUT, JOINT, OUTPUT, SIDES, average_key, eigen_keys, store
from kldwrm_fast.ops import Operations


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
    eigenvalue_floor: float = 0.0


class CurvatureEstimator:
    """Statistics, averages and eigendecompositions of ``curvature``'s blocks (see the module docstring).

    Args:
        curvature: the blocks and their capture hooks.
        state_of: the per-block state dict of a block.
        schedule: ``(step k, stat_freq, inv_freq)`` now.
        data_parallel: the process group (``world_size == 1``: one process).
        fisher: ``"sampled"`` or ``"empirical"`` (empirical statistics are unscaled with the gradients).
        ops: the dispatched operations; replaced when the parameters move to another device.
        owner: the optimizer's class name, for warnings.
    """

    pack_statistics = True  # data parallel: all-reduce only the upper triangles of the symmetric factors

    def __init__(
        self,
        curvature: Curvature,
        state_of: Callable[[FactoredBlock], dict],
        schedule: Callable[[], tuple[int, int, int]],
        data_parallel: distributed.DataParallel,
        fisher: str,
        ops: Operations,
        owner: str,
    ) -> None:
        self.curvature, self.state_of, self.schedule = curvature, state_of, schedule
        self.data_parallel, self.fisher, self.ops, self.owner = data_parallel, fisher, ops, owner
        curvature.capture_due = self.statistics_due

    def statistics_due(self) -> bool:
        """Whether the coming step collects statistics (the capture hooks ask this)."""
        k, stat_freq, _ = self.schedule()
        return k % stat_freq == 0

    def due(self) -> tuple[bool, bool]:
        """``(statistics due, eigendecomposition due)`` at the coming step (Note [step cadence] of
        :mod:`kldwrm_fast.optim.base`): a due step after the first on which nothing was captured has neither."""
        k, stat_freq, inv_freq = self.schedule()
        stats_due, inverse_due = k % stat_freq == 0, k % inv_freq == 0
        if stats_due and k > 0 and not any(block.has_statistics() for block in self.curvature.blocks):
            return False, False  # eval mode or no_grad forwards: keep the averages and decompositions
        return stats_due, inverse_due

    def steps_without_inverse(self) -> bool:
        """Whether steps without an eigendecomposition follow an inverse step (``inv_freq > 1``)."""
        return self.schedule()[2] > 1

    def joining(self, candidates: list[int]) -> set[int]:
        """The ``candidates`` (blocks without curvature, on an inverse step) that captured statistics; under data
        parallelism, those that did on every rank, so that all ranks agree (one small all-reduce, only while
        some block has yet to join)."""
        blocks = self.curvature.blocks
        if not self.data_parallel.active or not candidates:
            return {i for i in candidates if blocks[i].has_statistics()}
        flags = torch.tensor([float(blocks[i].has_statistics()) for i in candidates], device=blocks[0].key.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
        return {i for i, flag in zip(candidates, flags.tolist()) if flag}

    def refresh(self, blocks: list[FactoredBlock], info: StepInfo, rho: float, reweight: Optional[float]) -> None:
        """Statistics and eigendecompositions due at this step for ``blocks``.

        With ``reweight = c_k`` the decomposed factors are ``Â, Γ̂`` (Q, QE); without, ``Ā, Γ̄`` (KFAC, SO).
        """
        if not info.stats_due:
            return
        empirical = self.fisher == "empirical"
        factor = float(self.curvature.forward_passes()) if empirical else 1.0
        unscale = info.grad_unscale if empirical else None
        reweight_now = reweight if info.inverse_due else None
        if self.data_parallel.active:
            self._refresh_distributed(blocks, info, rho, reweight, reweight_now, factor, unscale)
            return
        factors = []
        for block in blocks:
            state = self.state_of(block)
            if block.has_statistics():
                hats = block.update_statistics(state, self.ops, rho, reweight_now, factor, unscale)
            else:
                hats = block.repeat_statistics(state, rho, reweight_now)
            factors += self._decomposition_targets(block, state, hats)
        if info.inverse_due:
            requests = [self._eigen_request(block, key, matrix) for block, key, matrix in factors]
            failed: list[int] = []
            for (block, key, _), (vectors, values) in zip(factors, decompose_many(requests, self.ops.eigh, failed)):
                vectors_key, values_key = eigen_keys(key)
                state = self.state_of(block)
                store(state, vectors_key, vectors)
                store(state, values_key, _floored(values, info.eigenvalue_floor))
            self._restart_non_finite_averages({factors[i][0] for i in failed})
            info.batches.compact([self.state_of(block) for block in blocks])

    def decompose_joint(self, blocks: list[FactoredBlock], damping: float) -> None:
        """Q's exact mode on an inverse step, after :meth:`refresh` decomposed the averages: the eigendecomposition
        of each local factor whitened by its average (:mod:`kldwrm_fast.curvature.joint`), grouped and batched with
        the fallback ladder as the factors' own, stored under ``Q{side}_joint``, ``d{side}_joint`` (this step only).
        A whitened factor whose every rung fails gets the identity, not an earlier decomposition."""
        factors = []
        for block in blocks:
            state = self.state_of(block)
            alphas = dict(zip((OUTPUT, INPUT), damping_split(state["dG"], state["dA"], damping)))
            for side in SIDES:
                q, d = (state[key] for key in eigen_keys(side))
                factors.append((block, side + JOINT, whitened_local(state[side], q, d, alphas[side])))
        if self.data_parallel.active:
            self._decompose_distributed(factors, 0.0)
            return
        requests = [self._eigen_request(block, key, matrix) for block, key, matrix in factors]
        for (block, key, _), (vectors, values) in zip(factors, decompose_many(requests, self.ops.eigh)):
            state = self.state_of(block)
            state[eigen_keys(key)[0]], state[eigen_keys(key)[1]] = vectors, values

    def _restart_non_finite_averages(self, blocks) -> None:
        """Zero the averages that overflowed (found only where a decomposition failed: no sync otherwise), so that
        they grow again from the next statistics instead of staying infinite for good."""
        for block in blocks:
            state = self.state_of(block)
            for side in SIDES:
                key = average_key(side)
                if not torch.isfinite(state[key]).all():
                    state[key].zero_()
                    warnings.warn(
                        f"{self.owner}: the {'input' if side == INPUT else 'output'} factor average of "
                        f"{block.name} overflowed; it restarts from zero with the next statistics",
                        RuntimeWarning,
                        stacklevel=6,
                    )

    def _decomposition_targets(self, block, state: dict, hats) -> list[tuple]:
        """``(block, key, matrix)`` per factor to decompose on an inverse step, stored as ``Q{key}``, ``d{key}``.

        KFAC, SO: the averages under ``"A"``, ``"G"``. Q, QE (``hats`` given): the reweighted factors, under
        ``"A"``/``"G"`` when every step is an inverse step, else under ``"A_hat"``/``"G_hat"`` (this step only)
        beside the averages under ``"A"``/``"G"`` for the steps that follow (docs/algorithms.md §2, eq. (20)).
        """
        averages = [(block, side, state[average_key(side)]) for side in SIDES]
        if hats is None:
            return averages
        if not self.steps_without_inverse():
            return list(zip((block, block), SIDES, hats))
        return list(zip((block, block), (f"{side}_hat" for side in SIDES), hats)) + averages

    def _eigen_request(self, block, key: str, matrix: Tensor) -> tuple:
        """``(matrix, previous decomposition or None, name)`` for the eigendecomposition of one factor."""
        state = self.state_of(block)
        side = key[0]
        joint = key.endswith(JOINT)  # no earlier decomposition of the whitened factor stands in for it
        stored = [eigen_keys(name) for name in (key, side) if eigen_keys(name)[0] in state and not joint]
        previous = (state[stored[0][0]], state[stored[0][1]]) if stored else None
        prefix = "reweighted " if key.endswith("_hat") else "whitened local " if joint else ""
        kind = f"{prefix}{'input' if side == INPUT else 'output'}"
        return matrix, previous, f"{kind} factor of {block.name}"

    def _local_factor(self, rows: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
        """``scale · rowsᵀrows`` through the dispatched fused factor update (an average started from it, ρ = 0,
        into a scratch buffer), exactly symmetric, as on the single-process path."""
        n = rows.shape[1]
        scratch = rows.new_empty((n, n), dtype=dtype)
        return self.ops.factor_update(rows, scratch, rows.new_empty(0, dtype=dtype), scale, 0.0, 0.0, True, False)

    def _refresh_distributed(self, blocks, info, rho, reweight, reweight_now, factor, unscale) -> None:
        """As :meth:`refresh`, with local factors averaged over ranks and eigendecompositions shared out by cost
        (each factor decomposed by one rank and broadcast)."""
        locals_ = []
        for block in blocks:
            if not block.has_statistics():  # its averages stand in (Note [which blocks take part])
                state = self.state_of(block)
                locals_ += [(block, side, state[average_key(side)].clone()) for side in SIDES]
                continue
            for side, (rows, scale) in block.statistics_rows(factor, unscale).items():
                locals_.append((block, side, self._local_factor(rows, scale, block.dtype)))
        distributed.average_symmetric_([local for _, _, local in locals_], pack=self.pack_statistics)
        reweighted: dict = {}  # block -> {side: X̂ or None}
        for block, side, local in locals_:
            state = self.state_of(block)
            reweighted.setdefault(block, {})[side] = block.fold_local(state, side, local, rho, reweight_now)
        if info.inverse_due:
            factors = []
            for block in blocks:
                state = self.state_of(block)
                hats = block.reweighted_pair(state, reweighted[block]) if reweight is not None else None
                factors += self._decomposition_targets(block, state, hats)
            self._decompose_distributed(factors, info.eigenvalue_floor)

    def _decompose_distributed(self, factors: list, floor: float) -> None:
        owners = distributed.assign_by_cost(
            [matrix.shape[0] for _, _, matrix in factors], self.data_parallel.world_size
        )
        rank = self.data_parallel.rank
        mine = [i for i, owner in enumerate(owners) if owner == rank]
        # This rank's share in one grouped call (batched solver, one host check), as on a single process.
        decomposed = dict(zip(mine, decompose_many([self._eigen_request(*factors[i]) for i in mine], self.ops.eigh)))
        for index, ((block, key, matrix), owner) in enumerate(zip(factors, owners)):
            state = self.state_of(block)
            keys = eigen_keys(key)
            if owner == rank:
                vectors, values = decomposed[index]
            else:
                vectors, values = torch.empty_like(matrix), matrix.new_empty(matrix.shape[0])
            vectors, values = vectors.contiguous().clone(), values.contiguous().clone()
            torch.distributed.broadcast(vectors, src=owner)
            torch.distributed.broadcast(values, src=owner)
            store(state, keys[0], vectors)
            store(state, keys[1], _floored(values, floor))


def _floored(values: Tensor, floor: float) -> Tensor:
    """Eigenvalues below ``floor`` set to zero (before damping; the author's code uses 1e-6); as they are for 0."""
    return values if floor == 0 else values.masked_fill(values < floor, 0.0)
