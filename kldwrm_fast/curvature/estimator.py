"""The curvature estimator: everything on the curvature side of a step (docs/algorithms.md §2, §6) — the blocks built
from the model, the cadence, which blocks take part, the batched-call groups, the state's moves with the model, and
the refresh of statistics and eigendecompositions for one process or many.

The optimizers hold the step rules. Each step asks the estimator what is due (:meth:`CurvatureEstimator.due`) and
then for a :class:`StepPlan` (:meth:`CurvatureEstimator.plan`), and its rule hands the plan to
:meth:`CurvatureEstimator.refresh`. The cadence is read from one source, the optimizer's first param group and its
step counter, by the capture hooks and by the step alike. Both the single-process and the data-parallel path
compute local factors with the dispatched fused ``factor_update``.

Per-block state lives in the optimizer's ``state`` (so ``state_dict`` carries it): the optimizer attaches its
state and first param group (:meth:`CurvatureEstimator.attach`) when it is built and after loading a state dict.

Note [step cadence]
    Step k (counted from 0) collects statistics iff ``k % stat_freq == 0`` and eigendecomposes iff
    ``k % inv_freq == 0``; since ``inv_freq`` is a multiple of ``stat_freq``, every inverse step is also a
    statistics step. Between statistics steps the averages are unchanged (eq. (20)); preconditioning uses
    the most recent eigendecomposition, while products with the averages (``M``) use the current ones.
    A due step (after the first) on which no layer captured anything — the model ran in eval mode or
    without gradients — is treated as a step without statistics. A layer that captured nothing while
    others did keeps its statistics (Note [which blocks take part]). The cadence is read from the first
    param group only (the hooks and ``step`` alike), so a loaded ``state_dict``'s cadence governs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast import distributed
from kldwrm_fast.curvature import lowrank
from kldwrm_fast.curvature.base import Curvature
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.curvature.capture import KroneckerCurvature
from kldwrm_fast.curvature.eigen import decompose_many
from kldwrm_fast.curvature.joint import damping_split, whitened_local
from kldwrm_fast.curvature.state import (
    GLOBAL,
    INPUT,
    JOINT,
    OUTPUT,
    SIDES,
    average_key,
    eigen_keys,
    has_curvature,
    store,
)
from kldwrm_fast.curvature.warm import WarmStart
from kldwrm_fast.ops import operations_for, reference


@dataclass
class StepPlan:
    """What one step does on the curvature side, besides the gradients: lr, cadence, a loss scaler's ``1/scale``,
    the blocks it preconditions (``indices`` into ``curvature.blocks``, the blocks themselves, grouped for batched
    calls by ``batches``), and the blocks with a gradient but no curvature yet (``plain``: gradient descent)."""

    lr: float
    stats_due: bool
    inverse_due: bool
    grad_unscale: Optional[Tensor]
    indices: tuple[int, ...]
    blocks: list[FactoredBlock]
    batches: BlockBatches
    plain: list[FactoredBlock]
    eigenvalue_floor: float = 0.0


class CurvatureEstimator:
    """The curvature side of an optimizer (see the module docstring).

    Args:
        model: an ``nn.Module`` (Kronecker blocks with capture hooks for its Linear/Conv2d/Embedding layers) or a
            prebuilt :class:`~kldwrm_fast.curvature.Curvature`, such as the exact ``DenseCurvature`` used as a test
            oracle.
        options: the rule's options (:class:`kldwrm_fast.optim.options.Options`); read here: ``fisher``
            (``"sampled"`` or ``"empirical"``: empirical statistics are unscaled with the gradients),
            ``predictive`` (the distribution the sampled Fisher draws from), ``backend`` (chosen again for the
            device when the parameters move), ``bias``, ``repeated_calls``, ``weight_sharing``, ``max_factor_dim``.
        predictive_module: as the optimizers take it.
        needs_predictive_output: whether the rule reads the model's outputs as ``predictive``'s (QE's KL terms).
        owner: the optimizer's class name, for warnings.

    Attributes:
        curvature, data_parallel, backend, ops, batches (every block's groups; subsets are cached).
    """

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        options,
        predictive_module: Optional[nn.Module],
        needs_predictive_output: bool,
        owner: str,
    ) -> None:
        self.data_parallel = distributed.data_parallel_for(model)
        self.fisher, self.owner, self.requested_backend = options.fisher, owner, options.backend
        self.curvature = self._build(model, options, predictive_module, needs_predictive_output)
        self.backend, self.ops = operations_for(options.backend, self.device)
        self.batches = BlockBatches(self.curvature.blocks)
        self._batch_cache: dict[tuple[int, ...], BlockBatches] = {}
        self._layout = self._parameter_layout()
        self._warned_plain: set[str] = set()
        self._positions: Optional[dict[int, int]] = None  # id(block) -> its index: the low-rank seeds
        self._state: dict = {}
        self._group: dict = {}
        self.decompositions = {"exact": 0, "warm": 0, "low_rank": 0}
        """Dense factor decompositions since construction: exact ones, accepted warm updates and low-rank ones
        (diagnostics; not saved)."""
        self.curvature.capture_due = self.statistics_due

    def _build(self, model, options, predictive_module, needs_output):
        if isinstance(model, Curvature):
            return model
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be an nn.Module or a Curvature, got {type(model).__name__}; pass the model itself, not "
                "model.parameters() (the optimizer hooks its Linear/Conv2d layers to collect curvature)"
            )
        if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(
                f"Invalid model: nn.DataParallel over {len(model.device_ids)} GPUs runs copies of the layers at "
                "every forward, which the curvature hooks do not see (every layer would take plain gradient "
                "descent); use DistributedDataParallel (torchrun), or the model on one GPU"
            )
        seed = int(torch.randint(0, 2**62, (1,)).item()) + self.data_parallel.rank
        curvature = KroneckerCurvature(
            model, options.fisher, options.predictive, seed, separate_bias=options.bias == "separate",
            repeated_calls=options.repeated_calls, predictive_module=predictive_module,
            needs_predictive_output=needs_output, weight_sharing=options.weight_sharing,
            max_factor_dim=options.max_factor_dim,
        )  # fmt: skip
        # What the curvature assumes, each named once at construction.
        notices = (
            (
                curvature.shared_with_other_modules,
                "layers whose weight another module also uses (tied weights) are preconditioned with the layer's "
                "own statistics only (their gradient includes the other use, their curvature does not)",
            ),
            (
                curvature.own_forwards,
                "layers whose class replaces its base class's forward (nn.Linear, nn.Conv2d, nn.Embedding, a "
                "normalisation layer) are preconditioned as if they computed what the base class does (their "
                "curvature is wrong if they compute something else, such as a scaled weight)",
            ),
        )
        for names, what in notices:
            if names:
                warnings.warn(f"{self.owner}: {what}: {', '.join(names)}", UserWarning, stacklevel=5)
        return curvature

    @property
    def device(self) -> torch.device:
        """The device of the parameters (of the first block)."""
        return self.curvature.blocks[0].key.device

    def attach(self, state: dict, group: dict) -> None:
        """Read per-block state from ``state`` (the optimizer's, keyed by ``block.key``, with the step counter under
        :data:`~kldwrm_fast.curvature.state.GLOBAL`) and the cadence from ``group`` (its first param group)."""
        self._state, self._group = state, group

    def state_of(self, block: FactoredBlock) -> dict:
        """The per-block state (factors, eigendecomposition, recursion buffers)."""
        return self._state[block.key]

    def _schedule(self) -> tuple[int, int, int]:
        return self._state[GLOBAL]["step"], self._group["stat_freq"], self._group["inv_freq"]

    def statistics_due(self) -> bool:
        """Whether the coming step collects statistics (the capture hooks ask this)."""
        k, stat_freq, _ = self._schedule()
        return k % stat_freq == 0

    def due(self) -> tuple[bool, bool]:
        """``(statistics due, eigendecomposition due)`` at the coming step (Note [step cadence]): a due step after
        the first on which nothing was captured has neither."""
        k, stat_freq, inv_freq = self._schedule()
        stats_due, inverse_due = k % stat_freq == 0, k % inv_freq == 0
        if stats_due and k > 0 and not any(block.has_statistics() for block in self.curvature.blocks):
            return False, False  # eval mode or no_grad forwards: keep the averages and decompositions
        return stats_due, inverse_due

    def steps_without_inverse(self) -> bool:
        """Whether steps without an eigendecomposition follow an inverse step (``inv_freq > 1``)."""
        return self._schedule()[2] > 1

    def warm_start(self) -> Optional[WarmStart]:
        """The warm start of this step's refresh (docs/algorithms.md §6.5), or None where it decomposes exactly:
        ``eigensolver="exact"``, or every ``full_every``-th refresh (counted from step 0, so a resumed run forces
        the same ones)."""
        group = self._group
        if group["eigensolver"] != "warm":
            return None
        k, _, inv_freq = self._schedule()
        full_every = group["full_every"]
        if full_every is not None and (k // inv_freq) % full_every == 0:
            return None
        return WarmStart(group["warm_iters"], group["warm_tol"])

    def _decompose(
        self, factors: list, failed: Optional[list[int]] = None, warm: Optional[WarmStart] = None
    ) -> list[tuple]:
        """:func:`~kldwrm_fast.curvature.eigen.decompose_many` with the dispatched solver, counted in
        :attr:`decompositions`; with the group's ``rank`` set (KFAC, SO), the factors it applies to go to
        :func:`kldwrm_fast.curvature.lowrank.decompose_many` and come back as ``(U, d, t)``. ``factors``: ``(block,
        key, matrix)`` per factor; returns the decompositions in order."""
        requests = [self._eigen_request(*factor) for factor in factors]
        rank = self._group.get("rank")
        low = [i for i, request in enumerate(requests) if lowrank.applies(request[0], rank)]
        rest = sorted(set(range(len(requests))) - set(low))
        for i in rest:  # a side low-rank under an earlier ``rank``: its basis is no start nor fallback for a full one
            if requests[i][1] is not None and len(requests[i][1]) == 3:
                requests[i] = (requests[i][0], None, requests[i][2])
        results: list = [None] * len(requests)
        for indices, decompose in ((low, self._decompose_low_rank), (rest, self._decompose_exact)):
            if not indices:
                continue
            lost: list[int] = []
            chosen = [factors[i] for i in indices]
            for index, result in zip(indices, decompose(chosen, [requests[i] for i in indices], lost, warm)):
                results[index] = result
            if failed is not None:
                failed += [indices[i] for i in lost]
        return results

    def _decompose_exact(self, _factors, requests: list, failed: list[int], warm: Optional[WarmStart]) -> list:
        warmed: list[int] = []
        results = decompose_many(requests, self.ops.eigh, failed, warm, warmed)
        dense = sum(1 for matrix, _, _ in requests if matrix.dim() == 2)
        self.decompositions["warm"] += len(warmed)
        self.decompositions["exact"] += dense - len(warmed)
        return results

    def _decompose_low_rank(self, factors: list, requests: list, failed: list[int], _warm) -> list:
        self.decompositions["low_rank"] += len(requests)
        if self._positions is None:
            self._positions = {id(block): i for i, block in enumerate(self.curvature.blocks)}
        step = self._schedule()[0]
        seeds = [lowrank.seed_of(step, self._positions[id(block)], key) for block, key, _ in factors]
        return lowrank.decompose_many(requests, self._group["rank"], seeds, failed)

    def plan(
        self, lr: float, stats_due: bool, inverse_due: bool, grad_unscale: Optional[Tensor], eigenvalue_floor: float
    ) -> StepPlan:
        """This step's :class:`StepPlan`: which blocks take part (Note [which blocks take part]) and their groups."""
        indices, plain = self._participants(inverse_due)
        blocks = [self.curvature.blocks[i] for i in indices]
        return StepPlan(
            lr, stats_due, inverse_due, grad_unscale, indices, blocks, self.batches_for(indices), plain,
            eigenvalue_floor,
        )  # fmt: skip

    def _participants(self, inverse_due: bool) -> tuple[tuple[int, ...], list[FactoredBlock]]:
        """Note [which blocks take part]
            A block whose parameters all have ``grad is None`` (frozen, or a branch the forward skipped) is not
            touched: parameters and state stay as they are. A block with a gradient is preconditioned once it
            has an eigendecomposition, or when this is an inverse step and it captured statistics (on every
            rank, under data parallelism); until then it takes a plain gradient-descent step (with a warning,
            once). A preconditioned block that captured nothing on a statistics step keeps its statistics: its
            averages stand in for the local factors.

        Returns ``(indices of the preconditioned blocks, blocks taking plain gradient descent)``.
        """
        blocks = self.curvature.blocks
        with_grad = [i for i, block in enumerate(blocks) if any(p.grad is not None for p in block.params)]
        curved = {i for i in with_grad if has_curvature(self.state_of(blocks[i]))}
        curved |= self.joining([i for i in with_grad if inverse_due and i not in curved])
        indices, plain = [], []
        for index in with_grad:
            block = blocks[index]
            if index in curved:
                indices.append(index)
                continue
            plain.append(block)
            if block.name not in self._warned_plain:
                self._warned_plain.add(block.name)
                why = block.why_plain or (
                    f"layer {block.name!r} has no curvature yet (its forward has not run in train mode with gradients "
                    "on an inverse step); it takes plain gradient descent until then"
                )
                warnings.warn(f"{self.owner}: {why}", UserWarning, stacklevel=5)
        return tuple(indices), plain

    def batches_for(self, indices: tuple[int, ...]) -> BlockBatches:
        """Batched-call groups for the blocks ``indices`` (cached: the set changes only when layers start or stop
        taking part in steps)."""
        if len(indices) == len(self.curvature.blocks):
            return self.batches
        batches = self._batch_cache.get(indices)
        if batches is None:
            batches = self._batch_cache[indices] = BlockBatches([self.curvature.blocks[i] for i in indices])
        return batches

    def _parameter_layout(self) -> tuple:
        return tuple((block.key.dtype, block.key.device) for block in self.curvature.blocks)

    def follow_parameters(self) -> bool:
        """After ``model.to(dtype or device)`` between steps: move the state along (factors and recursion buffers
        to each block's state dtype, everything to its device) and choose the backend again for the device.
        Returns whether anything moved."""
        layout = self._parameter_layout()
        if layout == self._layout:
            return False
        for block in self.curvature.blocks:
            state = self.state_of(block)
            for key, value in state.items():
                if isinstance(value, Tensor):
                    dtype = block.dtype if value.is_floating_point() else value.dtype
                    state[key] = value.to(device=block.key.device, dtype=dtype)
        self.batches = BlockBatches(self.curvature.blocks)
        self._batch_cache = {}
        self.backend, self.ops = operations_for(self.requested_backend, self.device)
        self._layout = layout
        return True

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

    def refresh(self, info: StepPlan, rho: float, reweight: Optional[float]) -> None:
        """Statistics and eigendecompositions due at this step for the plan's blocks.

        With ``reweight = c_k`` the decomposed factors are ``Â, Γ̂`` (Q, QE); without, ``Ā, Γ̄`` (KFAC, SO).
        """
        blocks = info.blocks
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
            failed: list[int] = []
            results = self._decompose(factors, failed, self.warm_start())
            for (block, key, _), result in zip(factors, results):
                _store_decomposition(self.state_of(block), key, result, info.eigenvalue_floor)
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
        for (block, key, _), (vectors, values) in zip(factors, self._decompose(factors)):
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
        previous = tuple(state[k] for k in (*stored[0], lowrank.tail_key(key)) if k in state) if stored else None
        prefix = "reweighted " if key.endswith("_hat") else "whitened local " if joint else ""
        kind = f"{prefix}{'input' if side == INPUT else 'output'}"
        return matrix, previous, f"{kind} factor of {block.name}"

    def _local_factor(self, rows: Tensor, scale: float, dtype: torch.dtype, diagonal: bool = False) -> Tensor:
        """``scale · rowsᵀrows`` through the dispatched fused factor update (an average started from it, ρ = 0,
        into a scratch buffer), exactly symmetric, as on the single-process path; a diagonal side's diagonal."""
        if diagonal:
            return reference.diagonal_local(rows, scale, dtype)
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
                locals_.append((block, side, self._local_factor(rows, scale, block.dtype, side in block.diagonal)))
        distributed.average_symmetric_([local for _, _, local in locals_], pack=self._group["pack_statistics"])
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
        """Each dense factor decomposed by one rank (shared out by cost) and broadcast; diagonal factors, whose
        decomposition is their entries, by every rank (the averaged factors are the same on all)."""
        dense = [i for i, (_, _, matrix) in enumerate(factors) if matrix.dim() == 2]
        costs = [factors[i][2].shape[0] for i in dense]
        owners = dict(zip(dense, distributed.assign_by_cost(costs, self.data_parallel.world_size)))
        rank = self.data_parallel.rank
        mine = [i for i in range(len(factors)) if owners.get(i, rank) == rank]
        # This rank's share in one grouped call (batched solver, one host check), as on a single process.
        decomposed = dict(zip(mine, self._decompose([factors[i] for i in mine], warm=self.warm_start())))
        low_rank = self._group.get("rank")
        for index, (block, key, matrix) in enumerate(factors):
            owner = owners.get(index)  # None: a diagonal factor, decomposed here
            if owner in (None, rank):
                result = decomposed[index]
            elif lowrank.applies(matrix, low_rank):
                n = matrix.shape[0]
                result = (matrix.new_empty(n, low_rank), matrix.new_empty(low_rank), matrix.new_empty(()))
            else:
                result = (torch.empty_like(matrix), matrix.new_empty(matrix.shape[0]))
            if owner is not None:
                result = tuple(t.contiguous().clone() for t in result)
                for tensor in result:
                    torch.distributed.broadcast(tensor, src=owner)
            _store_decomposition(self.state_of(block), key, result, floor)


def _store_decomposition(state: dict, key: str, result: tuple, floor: float) -> None:
    """``(Q, d)`` under ``Q{key}``, ``d{key}``, eigenvalues floored; a low-rank side's tail under ``t{key}``."""
    vectors_key, values_key = eigen_keys(key)
    store(state, vectors_key, result[0])
    store(state, values_key, _floored(result[1], floor))
    if len(result) == 3:
        store(state, lowrank.tail_key(key), _floored(result[2], floor))
    else:  # a side that was low-rank under another ``rank``
        state.pop(lowrank.tail_key(key), None)


def _floored(values: Tensor, floor: float) -> Tensor:
    """Eigenvalues below ``floor`` set to zero (before damping; the author's code uses 1e-6); as they are for 0."""
    return values if floor == 0 else values.masked_fill(values < floor, 0.0)
