"""Shared machinery of the four optimizers: construction, cadence, λ bookkeeping, plain-GD fallback.

Subclasses implement :meth:`CurvatureOptimizer._update`, the step rule of docs/algorithms.md §3, and read like it.

Note [step cadence]
    Step k (counted from 0) collects statistics iff ``k % stat_freq == 0`` and eigendecomposes iff
    ``k % inv_freq == 0``; since ``inv_freq`` is a multiple of ``stat_freq``, every inverse step is also a
    statistics step. Between statistics steps the averages are unchanged (eq. (20)); preconditioning uses
    the most recent eigendecomposition, while products with the averages (``M``) use the current ones.
    A due step (after the first) on which no layer captured anything — the model ran in eval mode or
    without gradients — is treated as a step without statistics. A layer that captured nothing while
    others did keeps its statistics (Note [which blocks take part]). The cadence is read from the first
    param group only (the hooks and ``step`` alike), so a loaded ``state_dict``'s cadence governs.

Note [zero learning rate]
    A step with ``lr = 0`` moves no parameter (it still collects statistics and eigendecomposes on
    schedule). The recursions' ratio ``λ_k/λ_{k−1} = lr_{k−1}/lr_k`` is taken as 0 when either side is 0,
    so SO's and Q's recursions restart from ``V`` after such a step, as at step 0.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch._functorch import config as functorch_config

from kldwrm_fast import distributed
from kldwrm_fast.curvature import Curvature, KroneckerCurvature
from kldwrm_fast.curvature.batching import BlockBatches
from kldwrm_fast.curvature.blocks import HALF_DTYPES, FactoredBlock
from kldwrm_fast.curvature.estimator import CurvatureEstimator, StepInfo
from kldwrm_fast.curvature.state import has_curvature
from kldwrm_fast.ops import Operations, operations_for, reference
from kldwrm_fast.optim.arguments import _check, validate_common, validate_routing, validate_structure
from kldwrm_fast.optim.checkpoint import GLOBAL, Checkpointing
from kldwrm_fast.optim.routing import RoutedParameters


class StepFlags:
    """What a step decides in one place and reads in another (Note [numerics on the device]).

    Attributes:
        accepted: this plain step's verdict, a 0-dim bool tensor on the device; None when no check is decided on
            the device (off plain steps, or ``check_numerics = False``).
        rejected: ``~accepted``, made when first needed; None while not made, and again whenever ``accepted``
            changes.
        verdict_on_device: whether this is a plain step whose checks are decided on the device.
        restart: whether the recursions restart at the next step (an update found non-finite on the host).
        taken: whether the step ran past its checks (not skipped on the host), so routed parameters step too.
        grad_unscale: the step's loss-scaler ``1/scale`` (or None), for the routed parameters.

    Set afresh by each step. They live on an object of their own, not on the optimizer: ``torch.compile``
    refuses an assignment to an attribute of a ``torch.optim`` optimizer inside the traced step (torch 2.11, the
    GPU machines' release: "Attempted setattr on a user-defined object") or drops it (torch 2.14), and applies
    one to a plain object's.
    """

    def __init__(self) -> None:
        self.accepted: Optional[Tensor] = None
        self.rejected: Optional[Tensor] = None
        self.verdict_on_device = False
        self.restart = False
        self.taken = False
        self.grad_unscale: Optional[Tensor] = None


class CurvatureOptimizer(Checkpointing, torch.optim.Optimizer):
    """Base class: builds the curvature from a model, runs the cadence, and applies a subclass's rule.

    ``model`` is an ``nn.Module`` (Kronecker blocks with capture hooks for its Linear/Conv2d layers) or a
    prebuilt :class:`~kldwrm_fast.curvature.Curvature` such as the exact
    :class:`~kldwrm_fast.curvature.DenseCurvature` used as a test oracle.

    Numerical faults (Note [numerics on the device]): a NaN or Inf in any gradient, or in the statistics captured
    for this step, skips the step — parameters and every piece of optimizer state stay as they were — with a
    warning, and counts it in :attr:`skipped_steps`. An update that comes out non-finite all the same (damping 0
    with a factor that has a zero eigenvalue, an overflow) is not applied: the parameters stay, the statistics
    of the step are kept, the recursions restart, with a warning, also counted. On statistics and inverse
    steps the checks are two host synchronisations; on the plain steps between them they are decided on the
    device, without one. ``check_numerics = False`` on the instance drops the checks.

    Copies: the optimizer holds hooks on the model, so ``copy.copy``, ``copy.deepcopy`` and pickling are
    refused; :meth:`state_dict` / :meth:`load_state_dict` carry everything. Loading checks that the state
    was saved by the same class, from blocks of the same shapes, with the same world size.

    Mixed precision: half-precision parameters keep float32 factors and state. With
    ``torch.amp.GradScaler``, ``scaler.step(opt)`` hands the optimizer its scale (the optimizer unscales
    gradients and empirical statistics itself and skips steps with infinite gradients); sampled statistics
    come from an unscaled backward of their own.
    """

    _step_supports_amp_scaling = True
    check_numerics = True
    _known_plain = False  # set by compiled_step around a step it knows to be plain
    _unmarked = True  # state tensors may be new since they were last marked static (see _before_traced_step)
    _kl_clip_checks_gradients = False  # whether the rule checks its update by _kl_clipped_and_finite (KFAC, SO)
    _reads_predictive_outputs = False  # whether the rule reads the model's outputs as `predictive`'s (QE's KL terms)

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        defaults: dict,
        fisher: str,
        predictive: str,
        backend: str,
        bias: str = "folded",
        repeated_calls: str = "expand",
        predictive_module: Optional[nn.Module] = None,
        others: Optional[Callable] = None,
        others_kwargs: Optional[dict] = None,
    ) -> None:
        validate_common(
            defaults["lr"], defaults["rho"], defaults["damping"], defaults["weight_decay"],
            defaults["stat_freq"], defaults["inv_freq"], fisher, predictive, backend,
        )  # fmt: skip
        validate_structure(bias, defaults["eigenvalue_floor"], repeated_calls)
        validate_routing(model, predictive_module, others, others_kwargs)
        # Recorded in every param group, so that state_dict() says which Fisher, blocks and backend produced it.
        defaults = dict(
            defaults, fisher=fisher, predictive=predictive, backend=backend, bias=bias, repeated_calls=repeated_calls
        )
        self.bias = bias
        self.repeated_calls = repeated_calls
        self.data_parallel = distributed.data_parallel_for(model)
        if isinstance(model, Curvature):
            curvature = model
        elif isinstance(model, nn.Module):
            if isinstance(model, nn.DataParallel) and len(model.device_ids) > 1:
                raise ValueError(
                    f"Invalid model: nn.DataParallel over {len(model.device_ids)} GPUs runs copies of the layers at "
                    "every forward, which the curvature hooks do not see (every layer would take plain gradient "
                    "descent); use DistributedDataParallel (torchrun), or the model on one GPU"
                )
            seed = int(torch.randint(0, 2**62, (1,)).item()) + self.data_parallel.rank
            curvature = KroneckerCurvature(
                model, fisher, predictive, seed, separate_bias=bias == "separate", repeated_calls=repeated_calls,
                predictive_module=predictive_module, needs_predictive_output=self._reads_predictive_outputs,
            )  # fmt: skip
        else:
            raise TypeError(
                f"model must be an nn.Module or a Curvature, got {type(model).__name__}; pass the model itself, not "
                "model.parameters() (the optimizer hooks its Linear/Conv2d layers to collect curvature)"
            )
        routed = others is not None and bool(curvature.other_params)
        own = [p for block in curvature.blocks for p in block.params] if routed else curvature.parameters()
        super().__init__(own, defaults)
        self.curvature = curvature
        self._others = RoutedParameters(curvature.other_params, others, others_kwargs) if routed else None
        if self._others is not None:
            self.param_groups.extend(self._others.groups)  # the same dicts: schedulers and zero_grad reach them
        self.fisher = fisher
        self.predictive = predictive
        self._requested_backend = backend
        self.backend, ops = operations_for(backend, self.curvature.blocks[0].key.device)
        self._batches = BlockBatches(curvature.blocks)  # every block; subsets are cached in _batch_cache
        self._batch_cache: dict[tuple[int, ...], BlockBatches] = {}
        self._layout = self._parameter_layout()
        self.state[GLOBAL] = {
            "step": 0, "lr_prev": None, "world_size": self.data_parallel.world_size, "optimizer": type(self).__name__,
        }  # fmt: skip
        self._skipped_host = 0  # steps skipped by a host-side check
        self._skipped_device: Optional[Tensor] = None  # plain steps skipped on the device, counted there
        self._skipped_reported = 0  # of those, already warned about
        self._now = StepFlags()
        self._warned_plain: set[str] = set()
        self.estimator = CurvatureEstimator(
            curvature, self.block_state, self._schedule, self.data_parallel, fisher, ops, type(self).__name__
        )
        # What the curvature leaves out or assumes, each named once at construction.
        notices = (
            (
                curvature.shared_with_other_modules,
                "layers whose weight another module also uses (tied weights) are preconditioned with the layer's "
                "own statistics only (their gradient includes the other use, their curvature does not)",
            ),
            (
                curvature.own_forwards,
                "layers whose class replaces nn.Linear's or nn.Conv2d's forward are preconditioned as if they "
                "computed y = W x + b (their curvature is wrong if they compute something else, such as a scaled "
                "weight)",
            ),
            (
                self._others.names if self._others is not None else [],
                f"parameters without a curvature block are routed to "
                f"{self._others.describe() if self._others is not None else ''} (others=)",
            ),
            (
                [name for name, _ in curvature.other_params] if self._others is None else [],
                "parameters outside nn.Linear/nn.Conv2d(groups=1) layers (and attention projections that "
                "nn.MultiheadAttention uses without calling them, and layers whose weight or bias is computed: "
                "parametrizations, weight_norm, spectral_norm) get plain gradient descent with the same lr and "
                "weight decay (others=torch.optim.AdamW routes them to an optimizer of your choice)",
            ),
        )
        for names, what in notices:
            if names:
                warnings.warn(f"{type(self).__name__}: {what}: {', '.join(names)}", UserWarning, stacklevel=3)

    @property
    def _ops(self) -> Operations:
        """The dispatched operations (the estimator's: one object for the step rules and the curvature)."""
        return self.estimator.ops

    @_ops.setter
    def _ops(self, ops: Operations) -> None:
        self.estimator.ops = ops

    @property
    def global_state(self) -> dict:
        """``{"step": k, "lr_prev": lr_{k−1} or None, ...}``: steps taken and the previous step's lr."""
        return self.state[GLOBAL]

    def _schedule(self) -> tuple[int, int, int]:
        """``(step k, stat_freq, inv_freq)``: the first param group is the one source of the cadence (the capture
        hooks and ``step()`` read it through the estimator; ``load_state_dict`` replaces it)."""
        group = self.param_groups[0]
        return self.global_state["step"], group["stat_freq"], group["inv_freq"]

    def block_state(self, block: FactoredBlock) -> dict:
        """The per-block state (factors, eigendecomposition, recursion buffers)."""
        return self.state[block.key]

    def block_states(self) -> list[dict]:
        """The per-block states, aligned with ``self.curvature.blocks``."""
        return [self.state[block.key] for block in self.curvature.blocks]

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
        raise TypeError(
            f"{type(self).__name__} cannot be copied or pickled: it holds hooks on the model; save "
            "opt.state_dict() and load it into a new optimizer built on the model (opt.load_state_dict)"
        )

    def _batches_for(self, indices: tuple[int, ...]) -> BlockBatches:
        """Batched-call groups for the blocks ``indices`` (cached: the set changes only when layers start or stop
        taking part in steps)."""
        if len(indices) == len(self.curvature.blocks):
            return self._batches
        batches = self._batch_cache.get(indices)
        if batches is None:
            batches = self._batch_cache[indices] = BlockBatches([self.curvature.blocks[i] for i in indices])
        return batches

    def _parameter_layout(self) -> tuple:
        return tuple((block.key.dtype, block.key.device) for block in self.curvature.blocks)

    def _follow_parameters(self) -> None:
        """After ``model.to(dtype or device)`` between steps: move the state along (factors and recursion buffers
        to each block's state dtype, everything to its device) and choose the backend again for the device."""
        layout = self._parameter_layout()
        if layout == self._layout:
            return
        for block in self.curvature.blocks:
            state = self.block_state(block)
            for key, value in state.items():
                if isinstance(value, Tensor):
                    dtype = block.dtype if value.is_floating_point() else value.dtype
                    state[key] = value.to(device=block.key.device, dtype=dtype)
        self._batches = BlockBatches(self.curvature.blocks)
        self._batch_cache = {}
        self.backend, self._ops = operations_for(self._requested_backend, self.curvature.blocks[0].key.device)
        self._layout = layout
        self._unmarked = True

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """Take one step; ``closure`` (optional) re-evaluates the model and returns the loss.

        See Note [which blocks take part]: a parameter whose ``.grad`` is None is not touched.

        Traced by a ``torch.compile`` of the user's (``torch.compile(opt.step)``, or a compiled training step that
        calls it), the step runs eagerly at a graph break: torch.compile drops (2.14) or refuses (2.11)
        assignments to an optimizer's attributes made in traced code, so counts of skipped steps (and flags the
        next step reads) went missing. :meth:`compiled_step` is the way to compile the plain step.
        """
        if not torch.compiler.is_compiling():
            return self._step_with_others(closure)
        if not self._known_plain:
            return _run_eagerly(self._step_with_others, closure)
        return self._take_step(closure)  # compiled_step's trace: it steps the routed parameters after the graph

    def _step_with_others(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        loss = self._take_step(closure)
        self._step_others()
        return loss

    def _step_others(self) -> None:
        """Step the routed parameters (``others=``, :mod:`kldwrm_fast.optim.routing`) when this step was taken."""
        if self._others is not None:
            self._others.step(self._now.taken, self._now.accepted, self._now.grad_unscale)

    def _routed(self, group: dict) -> bool:
        return self._others is not None and any(group is routed for routed in self._others.groups)

    @torch.no_grad()
    def _take_step(self, closure: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr = group["lr"]
        if not torch.compiler.is_compiling():  # compiled_step checks it on the host (lr is symbolic there)
            self._check_lr(lr)
        self._follow_parameters()
        k = self.global_state["step"]
        blocks = self.curvature.blocks
        stats_due, inverse_due = (False, False) if self._known_plain else self.estimator.due()
        unscale = self._grad_unscale(stats_due)
        plain_step = not (stats_due or inverse_due)
        self._now.accepted = self._now.rejected = None
        self._now.taken, self._now.grad_unscale = False, unscale
        self._now.verdict_on_device = self.check_numerics and plain_step
        if self.check_numerics and not plain_step:
            self._report_skipped()
            if not self._all_finite(self._checked_tensors(stats_due)):
                self._skip(f"NaN or Inf in the gradients or statistics of step {k}")
                self.curvature.clear()
                return loss
        indices, plain = self._participants(inverse_due)
        if self._now.verdict_on_device and not self._update_check_covers_gradients(group, lr, plain):
            self._now.accepted = self._finite_on_device(self._checked_tensors(False))
        info = StepInfo(
            lr, stats_due, inverse_due, unscale, indices, self._batches_for(indices), group["eigenvalue_floor"]
        )
        self._now.restart = False
        self._now.taken = True
        if indices:
            grads = [blocks[i].gradient(group["weight_decay"], unscale) for i in indices]
            self._update(group, [blocks[i] for i in indices], grads, info)
        if plain:
            self._add_to_parameters(plain, [block.gradient(group["weight_decay"], unscale) for block in plain], -lr)
        if self._others is None:
            for _, param in self.curvature.other_params:
                _gradient_descent(param, group, unscale, self._now.accepted)
        for extra in self.param_groups[1:]:
            if not self._routed(extra):
                for param in extra["params"]:
                    _gradient_descent(param, extra, unscale, self._now.accepted)
        if self._now.accepted is not None:
            self._counter("_skipped_device", (), self._now.accepted.device).add_(self._rejected_on_device())
        self.curvature.clear()
        self.global_state["step"] = k + 1
        self.global_state["lr_prev"] = None if self._now.restart else lr
        if not torch.compiler.is_compiling():
            self._unmarked = True
        return loss

    def compiled_step(self, **compile_options) -> Callable[..., Optional[Tensor]]:
        """:meth:`step`, with the plain steps (no statistics, no decomposition) run through
        ``torch.compile(self.step, fullgraph=True, **compile_options)``; statistics and inverse steps, and steps
        with a closure, run eagerly (they wait for the host: eigensolver flags, numerics checks). A plain step
        makes no host synchronisation (Note [numerics on the device]), so it traces into one graph; on CUDA,
        ``mode="reduce-overhead"`` replays it as a CUDA graph. Same results as :meth:`step` up to the compiler's
        reordering of float operations.

        torch.compile keeps a limited number of compiled versions per function
        (``torch._dynamo.config.recompile_limit``), and every optimizer's ``step`` is the same function to it;
        each instance takes two to four (the step counter's first value is specialised; Q's state gains keys
        over its first steps). When the limit is reached the plain steps run eagerly from then on, with
        one warning (the compiler raises before running anything, so no step is lost or taken twice). The step is
        traced with the PyTorch reference of the fused operations, whatever the backend: the Triton and CUDA ones
        are custom ops, whose float arguments (damping, Q's lr-dependent coefficient) the compiler would
        specialise, recompiling whenever one changes (see :class:`~kldwrm_fast.ops.dispatch.Operations`).

        With torch's default backend (inductor; ``mode`` and ``options`` as for ``torch.compile``) the compilation
        does not use AOTAutograd's cache: with torch 2.14, a graph loaded from it ignored a learning rate that
        changes between steps (a float the compiler turns into a graph input), so a second run trained with wrong
        steps, silently (reproduced by ``tests/test_compiled_step.py``)."""
        if compile_options.get("backend", "inductor") == "inductor":
            mode, options = compile_options.pop("mode", None), compile_options.pop("options", None)
            backend = _InductorWithoutAutogradCache(mode, options, compile_options.get("dynamic"))
            compile_options["backend"] = backend
        compiled = torch.compile(self.step, fullgraph=True, **compile_options)
        eager = False

        def step(closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
            nonlocal eager
            if eager or closure is not None or any(self.estimator.due()):
                return self.step(closure)
            self._check_lr(self.param_groups[0]["lr"])
            self._before_traced_step()
            # step() skips the cadence test: traced, its modular arithmetic on the step counter became guards that
            # failed (and recompiled) at other steps, or in another run that loaded the graph from torch's caches.
            self._known_plain = True
            try:
                loss = compiled()
                self._step_others()
                return loss
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                eager = True
                warnings.warn(
                    f"{type(self).__name__}.compiled_step: torch.compile reached its recompile limit "
                    f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit}; every "
                    "optimizer's step counts against it); plain steps run eagerly from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return self.step()
            finally:
                self._known_plain = False

        return step

    def _before_traced_step(self) -> None:
        """Run eagerly before each compiled plain step: what the step would otherwise do on attributes of the
        optimizer. torch.compile drops (2.14) or refuses (2.11) assignments to an optimizer's attributes made
        inside the traced ``step`` (writes into tensors are kept; see :class:`StepFlags` for the flags a step
        sets), so the device-side counters are made here, and the state follows the parameters here (a changed
        layout would be noticed in every trace and never recorded). Without this, rejected plain steps went
        uncounted and unreported when no eager plain step had made the counter (reproduced by
        ``tests/test_compiled_step.py``).

        It also marks every state tensor and counter as a static address for the compiler. A CUDA graph
        (``mode="reduce-overhead"``) is only used for a graph whose mutated inputs are all static: torch marks a
        ``torch.optim`` optimizer's state itself only when the optimizer has an ``_init_group``, so without the
        marks the momentum buffers and counters the plain step updates in place made inductor skip the CUDA
        graph (``tests/test_compiled_step.py`` reads inductor's own verdict on a CPU). The marks are unguarded (a
        replaced tensor makes the CUDA graph re-record, not the step recompile) and are made again only after an
        eager step, a change of layout or a ``load_state_dict``: the state is written in place
        (:func:`~kldwrm_fast.curvature.state.store`), so a plain step makes no new state tensor."""
        self._follow_parameters()
        counters = self._make_counters(self.curvature.blocks[0].key.device)
        if self._unmarked:
            for tensor in itertools.chain(counters, *(self._tensors_of(state) for state in self.state.values())):
                torch._dynamo.mark_static_address(tensor)
            self._unmarked = False

    def _make_counters(self, device: torch.device) -> list[Tensor]:
        """Create (or move to ``device``) the device-side counters a plain step updates; returns them."""
        return [self._counter("_skipped_device", (), device)]

    def _counter(self, name: str, size: tuple, device: torch.device) -> Tensor:
        """The device-side counter held in attribute ``name`` (:func:`device_counter`), assigned only when it is new
        or moved: in a compiled plain step it exists already (:meth:`_before_traced_step`), and the step makes no
        assignment to the optimizer (see :class:`StepFlags`)."""
        counter = device_counter(getattr(self, name), size, device)
        if counter is not getattr(self, name):
            setattr(self, name, counter)
        return counter

    @staticmethod
    def _tensors_of(state: dict) -> Iterator[Tensor]:
        return (value for value in state.values() if isinstance(value, Tensor))

    @staticmethod
    def _check_lr(lr) -> None:
        _check(
            isinstance(lr, (int, float)) and lr >= 0 and math.isfinite(lr),
            f"Invalid lr: {lr!r}; expected lr >= 0 (set by a scheduler?)",
        )

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
        curved = {i for i in with_grad if has_curvature(self.block_state(blocks[i]))}
        curved |= self.estimator.joining([i for i in with_grad if inverse_due and i not in curved])
        indices, plain = [], []
        for index in with_grad:
            block = blocks[index]
            if index in curved:
                indices.append(index)
                continue
            plain.append(block)
            if block.name not in self._warned_plain:
                self._warned_plain.add(block.name)
                warnings.warn(
                    f"{type(self).__name__}: layer {block.name!r} has no curvature yet (its forward has not run in "
                    "train mode with gradients on an inverse step); it takes plain gradient descent until then",
                    UserWarning,
                    stacklevel=3,
                )
        return tuple(indices), plain

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for NaN or Inf (reads the device-side count of plain steps: a host sync)."""
        self._report_skipped()
        return self._skipped_host + self._skipped_reported

    def _skip(self, reason: str) -> None:
        self._skipped_host += 1
        warnings.warn(
            f"{type(self).__name__}: {reason}; step skipped, parameters unchanged "
            f"({self._skipped_host + self._skipped_reported} skipped so far)",
            RuntimeWarning,
            stacklevel=4,
        )

    def _report_skipped(self) -> None:
        """Warn about plain steps skipped on the device since the last report (one host transfer, only once one
        has been counted); called on statistics and inverse steps and when :attr:`skipped_steps` is read."""
        if self._skipped_device is None:
            return
        count = int(self._skipped_device)
        new, self._skipped_reported = count - self._skipped_reported, count
        if new:
            warnings.warn(
                f"{type(self).__name__}: {new} step(s) between statistics steps had NaN or Inf in their gradients or "
                f"update; step skipped, parameters unchanged, the recursions restart "
                f"({self._skipped_host + count} skipped so far)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _rejected_on_device(self) -> Tensor:
        """``~accepted`` (a plain step's verdict must be set), made once per verdict."""
        if self._now.rejected is None:
            self._now.rejected = ~self._now.accepted
        return self._now.rejected

    def _masked(self, update: Tensor) -> Tensor:
        """``update``, zeroed in place when this plain step was rejected on the device (Note [numerics on the
        device]); as it is otherwise."""
        return update if self._now.accepted is None else update.masked_fill_(self._rejected_on_device(), 0.0)

    def _add_to_parameters(self, blocks, updates: list[Tensor], alpha: float = 1.0) -> None:
        """``W̄ ← W̄ + alpha · U`` for every block (block form ``updates``, any float dtype, rounded once to the
        parameters' dtype), in one multi-tensor operation. The updates are first zeroed in place when this plain
        step was rejected on the device (:meth:`_masked`)."""
        params, parts = [], []
        for block, update in zip(blocks, updates, strict=True):
            params += block.params
            parts += block.unflatten(self._masked(update))
        reference.scaled_add_(params, parts, alpha)

    def _kl_clipped_and_finite(self, directions: list[Tensor], vectors: list[Tensor], lr: float, group: dict) -> bool:
        """Scale ``directions`` (``P(v)`` per block) in place by K-FAC's KL clip factor ``ν`` (:func:`kl_clip_scale`
        of ``Σ⟨d, v⟩``); then whether they are finite (:meth:`_update_is_finite`).

        With the clip, its inner product is the check: it is non-finite whenever an entry of a direction is (an
        infinite entry times its vector's entry is infinite, or NaN where that is 0), and a non-finite ``v``
        makes its direction ``P(v)`` non-finite; with it finite, ``ν`` is finite. That spares a pass over the
        directions. An inner product that overflows with finite directions (past 3e38 in float32) is taken as
        non-finite: that step is skipped, where ``ν`` would have been 0."""
        kl_clip = group["kl_clip"]
        if kl_clip is None or lr == 0:
            return self._update_is_finite(directions, group)
        inner = summed_inner(directions, vectors)
        torch._foreach_mul_(directions, kl_clip_scale(inner, lr, kl_clip))
        return self._update_is_finite(directions, group, inner)

    def _update_is_finite(self, updates: list[Tensor], group: dict, total: Optional[Tensor] = None) -> bool:
        """Whether the computed updates are finite (one host sync; skipped with ``check_numerics = False``);
        ``total``, when given, is a 0-dim tensor that is non-finite whenever an update entry is, checked instead.

        A non-finite update (damping 0 with a factor that has a zero eigenvalue, or an overflow) skips the
        parameter update with a warning, and the recursions across it restart (``lr_prev`` is dropped), so
        nothing non-finite reaches the parameters or the next step.
        """
        if not self.check_numerics:
            return True
        if self._now.verdict_on_device:
            finite = self._finite_on_device(updates) if total is None else (total - total) == 0
            self._now.accepted = finite if self._now.accepted is None else self._now.accepted & finite
            self._now.rejected = None
            return True
        if self._all_finite(updates) if total is None else self._is_finite(total):
            return True
        self._now.restart = True
        self._skip(
            f"non-finite update at step {self.global_state['step']} (damping={group['damping']}: a factor with a "
            "zero eigenvalue needs damping > 0)"
        )
        return False

    def _update_check_covers_gradients(self, group: dict, lr: float, plain: list) -> bool:
        """Whether a plain step's gradients need no check of their own: the update's check (KFAC's and SO's KL clip
        inner product ``Σ⟨P(v), v⟩``, see :meth:`_kl_clipped_and_finite`; Q's its own) sees every gradient of the
        step.

        It does when the rule's check applies to this step (:meth:`_update_check_sees_gradients`), every
        parameter with a gradient is in a preconditioned block (none takes plain gradient descent) and no loss
        scaler reported ``found_inf``: a non-finite entry of ``v`` makes its column of ``Q_Γᵀ v`` non-finite
        (``±inf``, or NaN where an eigenvector entry is 0), so every entry of ``Q_Γᵀ v Q_A`` is (an orthogonal
        ``Q_A`` has no zero row), and so every entry of ``P(v)``, whatever the summation order: the inner product
        is non-finite. That spares a pass over the gradients, and on the CPU about 0.1 ms of a plain step's host
        time on the paper CNN (five operations and the per-tensor bookkeeping of :meth:`_finite_total`)."""
        return (
            self._update_check_sees_gradients(group, lr)
            and not plain
            and getattr(self, "found_inf", None) is None
            and all(param.grad is None for _, param in self.curvature.other_params)
            and all(param.grad is None for extra in self.param_groups[1:] for param in extra["params"])
        )

    def _update_check_sees_gradients(self, group: dict, lr: float) -> bool:
        """Whether this step's check of the update is non-finite whenever a preconditioned block's gradient is
        (see :meth:`_update_check_covers_gradients`): KFAC and SO with the KL clip, whose inner product is the
        check; False for a rule that does not say so."""
        return self._kl_clip_checks_gradients and group["kl_clip"] is not None and lr != 0

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

    def _finite_on_device(self, tensors: list[Tensor]) -> Tensor:
        """Note [numerics on the device]
            On a plain step (no statistics, no decomposition) the checks are a 0-dim bool on the device,
            ``self._now.accepted``: the gradients' check at the start, and'ed with the update's (the update's alone
            where it sees every gradient: :meth:`_update_check_covers_gradients`). Every write the step
            makes is masked by it: parameter updates are zeroed (:meth:`_masked`), KFAC's momentum buffer keeps
            its value, and the recursions restart at the next step (the host cannot know to drop ``lr_prev``):
            SO's previous ``V`` is zeroed; Q restarts every block through its growth guard's pass (see
            ``QKLDWRM._apply_clipped``). The step counter advances. Rejected steps are counted on the device and
            reported on the next statistics or inverse step, or when :attr:`skipped_steps` is read. So a plain
            step makes no host synchronisation, and traces into one graph under ``torch.compile``.

        Whether all ``tensors`` (and a loss scaler's ``found_inf``) are finite, as a 0-dim bool tensor."""
        total = self._finite_total(tensors)
        if total is None:
            return torch.ones((), dtype=torch.bool, device=self.curvature.blocks[0].key.device)
        return (total - total) == 0  # exactly when total is finite: two operations where isfinite takes four

    def _finite_total(self, tensors: list[Tensor]) -> Optional[Tensor]:
        """A 0-dim sum over every entry that is non-finite whenever an entry is (and ``inf`` for a loss scaler's
        ``found_inf``); only finite entries whose sum overflows (3e38 in float32) would raise a false alarm. None
        when there is nothing to check.

        How it sums depends on where the tensors are. On a GPU, the L1 norms of all tensors in one multi-tensor
        op per precision. On the CPU, a sum per tensor of 4096 entries or more, and the multi-tensor norm for the
        smaller ones (where a call costs more than the entries): there ``_foreach_norm`` loops over the tensors
        anyway and is slow per entry (the checks of the bench workloads on this 2-core CPU, two runs: the MLP's
        gradients 493–526 µs against 127–130 µs, the wide CNN's gradients and statistics 2.76–2.79 ms against
        0.61–0.65 ms), and the raw sum is as good a test (±inf and NaN survive it). While torch.compile traces,
        the sum of ``t · 0`` over every entry: 0 when all are finite, NaN otherwise (never a false alarm); to the
        compiler ``_foreach_norm`` is an opaque call, and these sums fuse into the step's own kernels.
        Half-precision entries are summed in float32 (their range ends at 65504)."""
        if torch.compiler.is_compiling():
            totals = [(t * 0).sum(dtype=torch.float32) for t in tensors]
        else:
            summed, others = [], []
            for t in tensors:
                (summed if _summed_alone(t) else others).append(t)
            totals = [torch.stack([t.sum(dtype=_sum_dtype(t)) for t in summed]).sum()] if summed else []
            halves = [t for t in others if t.dtype in HALF_DTYPES]
            others = [t for t in others if t.dtype not in HALF_DTYPES]
            totals += [
                torch.stack(torch._foreach_norm(group, 1, dtype=dtype)).sum()
                for group, dtype in ((others, None), (halves, torch.float32))
                if group
            ]
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            totals.append(torch.where(found_inf.reshape(()) > 0, math.inf, 0.0))
        if not totals:
            return None
        total = totals[0]
        for other in totals[1:]:
            total = total + other.to(total.device)
        return total

    def _all_finite(self, tensors: list[Tensor]) -> bool:
        """One host sync: are all ``tensors`` (and a loss scaler's ``found_inf``) finite?

        One summing pass over each tensor (:meth:`_finite_total`; ``isfinite().all()`` takes three passes and a
        launch per tensor).
        """
        total = self._finite_total(tensors)
        return True if total is None else self._is_finite(total)

    def _is_finite(self, total: Tensor) -> bool:
        """Whether the 0-dim ``total`` is finite (one host sync; under data parallelism, on every rank)."""
        if not self.data_parallel.active:
            return math.isfinite(total.item())
        # Local statistics differ between ranks: all must agree to skip, or their collectives would part.
        finite = torch.isfinite(total).to(torch.float32)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    def _update(self, group: dict, blocks, grads: list[Tensor], info: StepInfo):
        """Apply the step rule of docs/algorithms.md §3 to the blocks (gradients ``grads`` in block form)."""
        raise NotImplementedError


class _InductorWithoutAutogradCache(torch._TorchCompileInductorWrapper):
    """torch.compile's default backend (inductor, with ``mode``, ``options`` and ``dynamic`` as there), compiling with
    AOTAutograd's cache off (see :meth:`CurvatureOptimizer.compiled_step`); the switch costs nothing per call. It
    is torch's own inductor wrapper, so the compiler treats it as inductor: a plain callable would make it
    specialise the learning rate and recompile whenever it changes."""

    def __call__(self, graph, example_inputs, **kwargs):
        with functorch_config.patch(enable_autograd_cache=False):
            return super().__call__(graph, example_inputs, **kwargs)


@torch._dynamo.disable
def _run_eagerly(function: Callable, *args):
    """``function(*args)`` outside any torch.compile trace (a graph break where a trace reaches it)."""
    return function(*args)


def _gradient_descent(param: Tensor, group: dict, grad_unscale: Optional[Tensor], accepted: Optional[Tensor]) -> None:
    """``p ← p − lr (∇p + wd · p)`` with the group's lr and weight decay; untouched when ``p.grad`` is None, or when
    ``accepted`` (a plain step's device-side verdict) is false."""
    if param.grad is None:
        return
    grad = param.grad if grad_unscale is None else param.grad * grad_unscale
    update = torch.add(grad, param, alpha=group["weight_decay"])
    if accepted is not None:
        update.masked_fill_(~accepted, 0.0)
    param.add_(update, alpha=-group["lr"])


def _summed_alone(tensor: Tensor) -> bool:
    """Whether :meth:`CurvatureOptimizer._finite_total` sums ``tensor`` on its own: a CPU tensor of 4096 entries or
    more (below that a separate call costs more than ``_foreach_norm``'s slower pass over the entries)."""
    return tensor.device.type == "cpu" and tensor.numel() >= 4096


def _sum_dtype(tensor: Tensor) -> Optional[torch.dtype]:
    """The dtype :meth:`CurvatureOptimizer._finite_total` sums ``tensor`` in: float32 for half precision."""
    return torch.float32 if tensor.dtype in HALF_DTYPES else None


def device_counter(count: Optional[Tensor], size: tuple, device: torch.device) -> Tensor:
    """An int64 counter of ``size`` on ``device``: zeros the first time, ``count`` moved there after the model
    moved, ``count`` itself otherwise (counted on the device, in place, without a host sync)."""
    if count is None:
        return torch.zeros(size, dtype=torch.int64, device=device)
    return count if count.device == device else count.to(device)


def tensor_norms(tensors: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each tensor (0-dim, on its device): one multi-tensor op, or, while torch.compile traces, a
    norm per tensor, which the compiler fuses into the step's kernels (``_foreach_norm`` is an opaque call to
    it; on the CPU, a norm per tensor)."""
    if torch.compiler.is_compiling():
        return [torch.linalg.vector_norm(t) for t in tensors]
    return list(torch._foreach_norm(tensors))


def summed_inner(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    """``Σ_blocks ⟨x, y⟩`` over aligned lists of equal-shape tensors, as a 0-dim device tensor (no host sync)."""
    return torch.stack([torch.vdot(x.flatten(), y.flatten()) for x, y in zip(xs, ys)]).sum()


def kl_clip_scale(inner: Tensor, lr: float, kl_clip: float) -> Tensor:
    """``min(1, sqrt(kl_clip / (lr² · inner)))`` for ``lr > 0`` (1 where ``inner ≤ 0``; NaN stays NaN), as
    ``rsqrt(inner) · sqrt(kl_clip)/lr``: four device operations, no host sync."""
    return (inner.clamp_min(0.0).rsqrt() * (math.sqrt(kl_clip) / lr)).clamp(max=1.0)
