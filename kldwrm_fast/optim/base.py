"""Shared machinery of the four optimizers: construction, cadence, λ bookkeeping, plain-GD fallback.

Subclasses implement :meth:`CurvatureOptimizer._update`, the step rule of SPEC §3, and read like it.

Note [step cadence]
    Step k (counted from 0) collects statistics iff ``k % stat_freq == 0`` and eigendecomposes iff
    ``k % inv_freq == 0``; since ``inv_freq`` is a multiple of ``stat_freq``, every inverse step is also a
    statistics step. Between statistics steps the averages are unchanged (eq. (20)); preconditioning uses
    the most recent eigendecomposition, while products with the averages (``M``) use the current ones.
    A due step (after the first) on which no layer captured anything — the model ran in eval mode or
    without gradients — is treated as a step without statistics. A layer that captured nothing while
    others did raises an error naming it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast import distributed
from kldwrm_fast.curvature import Curvature, KroneckerCurvature
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.blocks import HALF_DTYPES, FactoredBlock
from kldwrm_fast.curvature.eigen import decompose_many
from kldwrm_fast.curvature.fisher import FISHER_TYPES, PREDICTIVES
from kldwrm_fast.ops import Operations, operations, reference, resolve_backend, validate_backend

GLOBAL = "global"


@dataclass
class StepInfo:
    """What one step knows besides the gradients: lr, cadence, and a loss scaler's ``1/scale``."""

    lr: float
    stats_due: bool
    inverse_due: bool
    grad_unscale: Optional[Tensor] = None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_common(lr, rho, damping, weight_decay, stat_freq, inv_freq, fisher, predictive, backend) -> None:
    """Raise ``ValueError`` naming the first argument outside its accepted range."""
    _check(isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr), f"Invalid lr: {lr!r}; expected lr > 0")
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


def validate_positive_or_none(name: str, value) -> None:
    """A clip threshold: a positive finite number, or None to disable clipping."""
    _check(
        value is None or (isinstance(value, (int, float)) and 0 < value < math.inf),
        f"Invalid {name}: {value!r}; expected {name} > 0 or None",
    )


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: builds the curvature from a model, runs the cadence, and applies a subclass's rule.

    ``model`` is an ``nn.Module`` (Kronecker blocks with capture hooks for its Linear/Conv2d layers) or a
    prebuilt :class:`~kldwrm_fast.curvature.Curvature` such as the exact
    :class:`~kldwrm_fast.curvature.DenseCurvature` used as a test oracle.

    Numerical faults: a NaN or Inf in any gradient, or in the statistics captured for this step, skips the
    step — parameters and every piece of optimizer state stay as they were — with a warning, and counts it
    in :attr:`skipped_steps`. The check costs one host synchronisation per step; set
    ``check_numerics = False`` on the instance to trade it for speed.

    Mixed precision: half-precision parameters keep float32 factors and state. With
    ``torch.amp.GradScaler``, ``scaler.step(opt)`` hands the optimizer its scale (the optimizer unscales
    gradients and empirical statistics itself and skips steps with infinite gradients); sampled statistics
    come from an unscaled backward of their own.
    """

    _step_supports_amp_scaling = True
    check_numerics = True
    pack_statistics = True  # data parallel: all-reduce only the upper triangles of the symmetric factors

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        defaults: dict,
        fisher: str,
        predictive: str,
        backend: str,
    ) -> None:
        validate_common(
            defaults["lr"], defaults["rho"], defaults["damping"], defaults["weight_decay"],
            defaults["stat_freq"], defaults["inv_freq"], fisher, predictive, backend,
        )  # fmt: skip
        self.data_parallel = distributed.data_parallel_for(model)
        if isinstance(model, Curvature):
            curvature = model
        elif isinstance(model, nn.Module):
            seed = int(torch.randint(0, 2**62, (1,)).item()) + self.data_parallel.rank
            curvature = KroneckerCurvature(model, fisher, predictive, seed)
        else:
            raise TypeError(f"model must be an nn.Module or a Curvature, got {type(model).__name__}")
        super().__init__(curvature.parameters(), defaults)
        self.curvature = curvature
        self.fisher = fisher
        self.predictive = predictive
        self.backend = resolve_backend(backend, self.curvature.blocks[0].key.device)
        self._ops: Operations = operations(self.backend)
        self._batches = BlockBatches(curvature.blocks)
        self.state[GLOBAL] = {"step": 0, "lr_prev": None, "world_size": self.data_parallel.world_size}
        self.skipped_steps = 0
        curvature.capture_due = self._statistics_due
        if curvature.other_params:
            names = ", ".join(name for name, _ in curvature.other_params)
            warnings.warn(
                f"{type(self).__name__}: parameters outside nn.Linear/nn.Conv2d(groups=1) layers get plain "
                f"gradient descent with the same lr and weight decay: {names}",
                UserWarning,
                stacklevel=3,
            )

    @property
    def global_state(self) -> dict:
        """``{"step": k, "lr_prev": lr_{k−1} or None}``: steps taken and the previous step's lr."""
        return self.state[GLOBAL]

    def _statistics_due(self) -> bool:
        return self.global_state["step"] % self.defaults["stat_freq"] == 0

    def block_state(self, block: FactoredBlock) -> dict:
        """The per-block state (factors, eigendecomposition, recursion buffers)."""
        return self.state[block.key]

    def block_states(self) -> list[dict]:
        """The per-block states, aligned with ``self.curvature.blocks``."""
        return [self.state[block.key] for block in self.curvature.blocks]

    def remove_hooks(self) -> None:
        """Remove every hook the optimizer registered on the model."""
        self.curvature.remove_hooks()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Take one step; ``closure`` (optional) re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr = group["lr"]
        _check(isinstance(lr, (int, float)) and lr > 0, f"Invalid lr: {lr!r}; expected lr > 0 (set by a scheduler?)")
        k = self.global_state["step"]
        blocks = self.curvature.blocks
        stats_due = k % group["stat_freq"] == 0
        inverse_due = k % group["inv_freq"] == 0
        if stats_due and k > 0 and not any(block.has_statistics() for block in blocks):
            # Nothing was captured (eval mode, no_grad forward): keep the averages and decompositions.
            stats_due = inverse_due = False
        info = StepInfo(lr, stats_due, inverse_due, self._grad_unscale(stats_due))
        if self.check_numerics and not self._all_finite(stats_due):
            self.skipped_steps += 1
            warnings.warn(
                f"{type(self).__name__}: NaN or Inf in the gradients or statistics of step {k}; step skipped, "
                f"parameters and state unchanged ({self.skipped_steps} skipped so far)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.curvature.clear()
            return loss
        grads = [block.gradient(group["weight_decay"], info.grad_unscale) for block in blocks]
        self._update(group, blocks, grads, info)
        for _, param in self.curvature.other_params:
            if param.grad is not None:
                grad = param.grad if info.grad_unscale is None else param.grad * info.grad_unscale
                param.add_(torch.add(grad, param, alpha=group["weight_decay"]), alpha=-lr)
        self.curvature.clear()
        self.global_state["step"] = k + 1
        self.global_state["lr_prev"] = lr
        return loss

    def _grad_unscale(self, stats_due: bool) -> Optional[Tensor]:
        """``1/scale`` when ``GradScaler.step`` passed a scale (gradients still scaled), else None."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            if (
                getattr(self, "found_inf", None) is not None
                and self.fisher == "empirical"
                and stats_due
                and any(block.has_statistics() for block in self.curvature.blocks)
            ):
                raise RuntimeError(
                    "fisher='empirical' cannot unscale its statistics after GradScaler.unscale_(); call "
                    "scaler.step(opt) without unscale_ on statistics steps, or use fisher='sampled'"
                )
            return None
        return 1.0 / scale

    def _all_finite(self, stats_due: bool) -> bool:
        """One host sync: are all gradients (and, on statistics steps, captured statistics) finite?

        The L1 norms of all tensors come from one multi-tensor op per precision (one pass each;
        ``isfinite().all()`` takes three passes and a launch per tensor); their sum is non-finite whenever any
        entry is. Only finite entries whose absolute sum overflows (3e38 in float32) would be flagged in error.
        """
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if stats_due:
            tensors += [t for block in self.curvature.blocks for t in block.captured()]
        halves = [t for t in tensors if t.dtype in HALF_DTYPES]
        others = [t for t in tensors if t.dtype not in HALF_DTYPES]
        # Half-precision sums would overflow at 65504: those are summed in float32.
        totals = [
            torch.stack(torch._foreach_norm(group, 1, dtype=dtype)).sum()
            for group, dtype in ((others, None), (halves, torch.float32))
            if group
        ]
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            totals.append(torch.where(found_inf.reshape(()) > 0, math.inf, 0.0))
        if not totals:
            return True
        total = sum(t.to(totals[0].device) for t in totals)
        if not self.data_parallel.active:
            return math.isfinite(total.item())
        # Local statistics differ between ranks: all must agree to skip, or their collectives would part.
        finite = torch.isfinite(total).to(torch.float32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

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
            hats = block.update_statistics(
                state, self._ops, group["rho"], reweight if info.inverse_due else None, factor, unscale
            )
            factors += self._decomposition_targets(block, state, hats)
        if info.inverse_due:
            requests = [self._eigen_request(block, key, matrix) for block, key, matrix in factors]
            for (block, key, _), result in zip(factors, decompose_many(requests, self._ops.eigh)):
                self.block_state(block)[f"Q{key}"], self.block_state(block)[f"d{key}"] = result
            self._batches.compact(self.block_states())

    def _decomposition_targets(self, block, state: dict, hats) -> list[tuple]:
        """``(block, key, matrix)`` per factor to decompose on an inverse step, stored as ``Q{key}``, ``d{key}``.

        KFAC, SO: the averages under ``"A"``, ``"G"``. Q, QE (``hats`` given): the reweighted factors, under
        ``"A"``/``"G"`` when every step is an inverse step, else under ``"A_hat"``/``"G_hat"`` (this step only)
        beside the averages under ``"A"``/``"G"`` for the steps that follow (SPEC §2, eq. (20)).
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

    def _update(self, group: dict, blocks, grads: list[Tensor], info: StepInfo):
        """Apply the step rule of SPEC §3 to the blocks (gradients ``grads`` in block form)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["curvature"] = self.curvature.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; tensors keep their saved dtype and move to the parameters' device.

        (``torch.optim.Optimizer`` would cast state to the parameter dtype, which would turn the float32
        state of half-precision parameters into half precision.)
        """
        state_dict = dict(state_dict)
        saved_world = state_dict["state"].get(GLOBAL, {}).get("world_size", 1)
        if saved_world != self.data_parallel.world_size:
            raise ValueError(
                f"Invalid state_dict: saved with world size {saved_world}, loading into world size "
                f"{self.data_parallel.world_size}; resume with the same number of processes"
            )
        curvature_state = state_dict.pop("curvature", {})
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, Tensor):
                    self.state[param][key] = value.to(param.device, copy=True)
        self.curvature.load_state_dict(curvature_state)


def kl_clip_factor(
    directions: list[Tensor], vectors: list[Tensor], lr: float, kl_clip: Optional[float]
) -> Optional[Tensor]:
    """``ν = min(1, sqrt(kl_clip / (lr² Σ_blocks ⟨d, v⟩)))`` as a device tensor (no host sync), or None."""
    if kl_clip is None:
        return None
    total = torch.stack([torch.vdot(d.flatten(), v.flatten()) for d, v in zip(directions, vectors)])
    total = total.sum().clamp_min(0.0)
    return torch.sqrt(kl_clip / (total * lr * lr)).clamp(max=1.0)
