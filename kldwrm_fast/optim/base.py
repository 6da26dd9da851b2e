"""The step every optimizer shares: its checks, the curvature plan, the rule, the parameters without curvature.

Subclasses implement :meth:`CurvatureOptimizer._update`, the step rule of docs/algorithms.md §3, and read like it.
What is around it lives in files of its own: the options (:mod:`~kldwrm_fast.optim.options`), the numerical-fault
verdict (:mod:`~kldwrm_fast.optim.numerics`), the parameter updates (:mod:`~kldwrm_fast.optim.updates`), the
compiled step (:mod:`~kldwrm_fast.optim.compiled`), checkpoints (:mod:`~kldwrm_fast.optim.checkpoint`), routed
parameters (:mod:`~kldwrm_fast.optim.routing`), and the whole curvature side — cadence (Note [step cadence]), which
blocks take part, the refresh — in :class:`~kldwrm_fast.curvature.estimator.CurvatureEstimator`.

Note [zero learning rate]
    A step with ``lr = 0`` moves no parameter (it still collects statistics and eigendecomposes on
    schedule). The recursions' ratio ``λ_k/λ_{k−1} = lr_{k−1}/lr_k`` is taken as 0 when either side is 0,
    so SO's and Q's recursions restart from ``V`` after such a step, as at step 0
    (:func:`~kldwrm_fast.optim.updates.recursion_ratio`).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.curvature.blocks import FactoredBlock
from kldwrm_fast.curvature.estimator import CurvatureEstimator, StepPlan
from kldwrm_fast.curvature.state import GLOBAL
from kldwrm_fast.ops import Operations, tracing
from kldwrm_fast.optim.checkpoint import Checkpointing
from kldwrm_fast.optim.compiled import CompiledStep, run_eagerly
from kldwrm_fast.optim.memory import memory_usage
from kldwrm_fast.optim.numerics import Numerics
from kldwrm_fast.optim.options import Options, check_lr, group_option, validate_routing
from kldwrm_fast.optim.routing import RoutedParameters
from kldwrm_fast.optim.updates import add_to_parameters, gradient_descent


class CurvatureOptimizer(CompiledStep, Checkpointing, torch.optim.Optimizer):
    """Base class: builds the curvature estimator from a model, takes the step's checks and plan, and applies a
    subclass's rule.

    ``model`` is an ``nn.Module`` (Kronecker blocks with capture hooks for its Linear/Conv2d layers) or a prebuilt
    :class:`~kldwrm_fast.curvature.Curvature` such as the exact :class:`~kldwrm_fast.curvature.DenseCurvature` used
    as a test oracle.

    Numerical faults (Note [numerics on the device] in :mod:`kldwrm_fast.optim.numerics`): a NaN or Inf in any
    gradient, or in the statistics captured for this step, skips the step with a warning, counted in
    :attr:`skipped_steps`; a non-finite update is not applied and the recursions restart. ``check_numerics = False``
    on the instance (or in a param group) drops the checks.

    Copies: the optimizer holds hooks on the model, so ``copy.copy``, ``copy.deepcopy`` and pickling are
    refused; :meth:`state_dict` / :meth:`load_state_dict` carry everything. Loading checks that the state
    was saved by the same class, from blocks of the same shapes, with the same world size.

    Mixed precision: half-precision parameters keep float32 factors and state. With
    ``torch.amp.GradScaler``, ``scaler.step(opt)`` hands the optimizer its scale (the optimizer unscales
    gradients and empirical statistics itself and skips steps with infinite gradients); sampled statistics
    come from an unscaled backward of their own.
    """

    _step_supports_amp_scaling = True
    update_check: Optional[str] = None  # what the rule's check of its update sees: one of numerics.UPDATE_CHECKS
    _reads_predictive_outputs = False  # whether the rule reads the model's outputs as `predictive`'s (QE's KL terms)

    check_numerics = group_option("check_numerics", "Whether steps check for NaN and Inf (default True).")
    pack_statistics = group_option(
        "pack_statistics", "Data parallel: whether only the factors' upper triangles are all-reduced (default True)."
    )

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        options: Options,
        predictive_module: Optional[nn.Module] = None,
        others: Optional[Callable] = None,
        others_kwargs: Optional[dict] = None,
    ) -> None:
        validate_routing(model, predictive_module, others, others_kwargs)
        owner = type(self).__name__
        self.fisher, self.predictive, self.bias = options.fisher, options.predictive, options.bias
        self.repeated_calls, self._requested_backend = options.repeated_calls, options.backend
        self.weight_sharing, self.max_factor_dim = options.weight_sharing, options.max_factor_dim
        self.estimator = CurvatureEstimator(model, options, predictive_module, self._reads_predictive_outputs, owner)
        curvature = self.estimator.curvature
        self.data_parallel = self.estimator.data_parallel
        routed = others is not None and bool(curvature.other_params)
        own = [p for block in curvature.blocks for p in block.params] if routed else curvature.parameters()
        # Every option in every param group, so that state_dict() says which Fisher, blocks and backend produced it.
        super().__init__(own, options.defaults())
        self.curvature = curvature
        weakref.finalize(self, curvature.remove_hooks)  # a dropped optimizer leaves no hooks holding its state
        self._others = RoutedParameters(curvature.other_params, others, others_kwargs) if routed else None
        if self._others is not None:
            self.param_groups.extend(self._others.groups)  # the same dicts: schedulers and zero_grad reach them
        self.state[GLOBAL] = dict(step=0, lr_prev=None, world_size=self.data_parallel.world_size, optimizer=owner)
        self.estimator.attach(self.state, self.param_groups[0])
        self.numerics = Numerics(owner, self.data_parallel)
        if self._others is not None:
            what = f"parameters without a curvature block are routed to {self._others.describe()} (others=)"
            self._notice(what, self._others.names)
        else:
            self._notice(
                "parameters outside nn.Linear/nn.Conv2d(groups=1)/nn.Embedding/nn.MultiheadAttention/affine "
                "normalisation layers (and an attention's bias_k/bias_v, its in_proj_bias with kdim/vdim, and layers "
                "whose weight or bias is computed: parametrizations, weight_norm, spectral_norm) get plain gradient "
                "descent with the same lr and weight decay (others=torch.optim.AdamW routes them to an optimizer of "
                "your choice)",
                [name for name, _ in curvature.other_params],
            )

    def _notice(self, what: str, names: list[str]) -> None:
        if names:
            warnings.warn(f"{type(self).__name__}: {what}: {', '.join(names)}", UserWarning, stacklevel=4)

    @property
    def _ops(self) -> Operations:
        """The dispatched operations (the estimator's: one object for the step rules and the curvature)."""
        return self.estimator.ops

    @_ops.setter
    def _ops(self, ops: Operations) -> None:
        self.estimator.ops = ops

    _batches = property(lambda self: self.estimator.batches, doc="Every block's batched-call groups (the estimator's).")

    @property
    def backend(self) -> str:
        """The backend that runs the fused operations on the parameters' device."""
        return self.estimator.backend

    @property
    def global_state(self) -> dict:
        """``{"step": k, "lr_prev": lr_{k−1} or None, ...}``: steps taken and the previous step's lr."""
        return self.state[GLOBAL]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for NaN or Inf (reads the device-side count of plain steps: a host sync)."""
        return self.numerics.skipped_steps

    def block_state(self, block: FactoredBlock) -> dict:
        """The per-block state (factors, eigendecomposition, recursion buffers)."""
        return self.state[block.key]

    def block_states(self) -> list[dict]:
        """The per-block states, aligned with ``self.curvature.blocks``."""
        return [self.state[block.key] for block in self.curvature.blocks]

    def memory_usage(self) -> dict:
        """Bytes of the optimizer's state per block and per kind (:func:`kldwrm_fast.optim.memory.memory_usage`)."""
        return memory_usage(self)

    def own_groups(self) -> list[dict]:
        """The param groups of this optimizer's own (not those of a routed optimizer)."""
        return [group for group in self.param_groups if not self._routed(group)]

    def _routed(self, group: dict) -> bool:
        return self._others is not None and any(group is routed for routed in self._others.groups)

    def remove_hooks(self) -> None:
        """Remove every hook the optimizer registered on the model."""
        self.curvature.remove_hooks()

    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; parameters added after construction take plain gradient
        descent with their group's ``lr`` and ``weight_decay`` (the curvature is built from the model once)."""
        super().add_param_group(param_group)
        if getattr(self, "curvature", None) is not None:
            warnings.warn(
                f"{type(self).__name__}: parameters added with add_param_group take plain gradient descent with "
                "their group's lr and weight_decay; give the optimizer the whole model to precondition them",
                UserWarning,
                stacklevel=2,
            )

    def __getstate__(self):
        raise TypeError(f"{type(self).__name__} cannot be copied or pickled: it holds hooks on the model; save "
                        "opt.state_dict() and load it into a new optimizer built on the model (opt.load_state_dict)")

    def _follow_parameters(self) -> None:
        """After ``model.to(dtype or device)`` between steps: the estimator moves the state along."""
        if self.estimator.follow_parameters():
            self._unmarked = True

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Take one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        See Note [which blocks take part] in :mod:`kldwrm_fast.curvature.estimator`: a parameter whose ``.grad`` is
        None is not touched.

        Traced by a ``torch.compile`` of the user's (``torch.compile(opt.step)``, or a compiled training step that
        calls it), the step runs eagerly at a graph break: torch.compile drops (2.14) or refuses (2.11)
        assignments to an optimizer's attributes made in traced code, so counts of skipped steps (and flags the
        next step reads) went missing. :meth:`compiled_step` is the way to compile the plain step.
        """
        if not tracing():
            return self._step_with_others(closure)
        if not self._known_plain:
            return run_eagerly(self._step_with_others, closure)
        return self._take_step(closure)  # compiled_step's trace: it steps the routed parameters after the graph

    def _step_with_others(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        loss = self._take_step(closure)
        self._step_others()
        return loss

    def _step_others(self) -> None:
        """Step the routed parameters (``others=``, :mod:`kldwrm_fast.optim.routing`) when this step was taken."""
        if self._others is not None:
            self._others.step(self.numerics.taken, self.numerics.accepted, self.numerics.grad_unscale)

    @torch.no_grad()
    def _take_step(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group, numerics = self.param_groups[0], self.numerics
        lr, checks = group["lr"], group["check_numerics"]
        if not tracing():  # compiled_step checks it on the host (lr is symbolic there)
            check_lr(lr)
        self._follow_parameters()
        k = self.global_state["step"]
        stats_due, inverse_due = (False, False) if self._known_plain else self.estimator.due()
        unscale = self._grad_unscale(stats_due)
        plain_step = not (stats_due or inverse_due)
        numerics.begin(checks and plain_step, unscale, getattr(self, "found_inf", None), self.estimator.device)
        if checks and not plain_step:
            numerics.report_skipped()
            if not numerics.all_finite(self._checked_tensors(stats_due)):
                numerics.skip(f"NaN or Inf in the gradients or statistics of step {k}")
                self.curvature.clear()
                return loss
        plan = self.estimator.plan(lr, stats_due, inverse_due, unscale, group["eigenvalue_floor"])
        if numerics.on_device and not numerics.update_check_covers_gradients(
            self.update_check, group, lr, bool(plan.plain) or self._gradients_outside_blocks()
        ):
            numerics.accept_only_if(numerics.finite_on_device(self._checked_tensors(False)))
        numerics.taken = True
        if plan.blocks:
            self._update(group, plan, [block.gradient(group["weight_decay"], unscale) for block in plan.blocks])
        if plan.plain:
            plain_grads = [block.gradient(group["weight_decay"], unscale) for block in plan.plain]
            add_to_parameters(plan.plain, plain_grads, -lr, numerics)
        if self._others is None:
            for _, param in self.curvature.other_params:
                gradient_descent(param, group, numerics)
        for extra in self.param_groups[1:]:
            if not self._routed(extra):
                for param in extra["params"]:
                    gradient_descent(param, extra, numerics)
        numerics.count_rejection()
        self.curvature.clear()
        self.global_state["step"] = k + 1
        self.global_state["lr_prev"] = None if numerics.restart else lr
        if not tracing():
            self._unmarked = True
        return loss

    def _gradients_outside_blocks(self) -> bool:
        """Whether a parameter outside every preconditioned block has a gradient (it takes gradient descent)."""
        outside = [param for _, param in self.curvature.other_params]
        outside += [param for extra in self.param_groups[1:] for param in extra["params"]]
        return any(param.grad is not None for param in outside)

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

    def _checked_tensors(self, stats_due: bool) -> list[Tensor]:
        """Every gradient, and on statistics steps every captured statistic."""
        tensors = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if stats_due:
            tensors += [t for block in self.curvature.blocks for t in block.captured()]
        return tensors

    def _make_counters(self, device: torch.device) -> list[Tensor]:
        """Create (or move to ``device``) the device-side counters a plain step updates; returns them."""
        return [self.numerics.counter(device)]

    def _update(self, group: dict, plan: StepPlan, grads: list[Tensor]) -> None:
        """Apply the step rule of docs/algorithms.md §3 to the plan's blocks (gradients ``grads`` in block form)."""
        raise NotImplementedError
