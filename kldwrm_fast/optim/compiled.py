"""``torch.compile`` support of the optimizers: :meth:`CompiledStep.compiled_step`, and what runs eagerly around each
compiled plain step (docs/algorithms.md §5, "Compiled steps").

:class:`CompiledStep` is a mixin of :class:`~kldwrm_fast.optim.base.CurvatureOptimizer`; it calls the optimizer's
``step``, ``_make_counters``, ``_step_others`` and ``estimator``.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor
from torch._functorch import config as functorch_config

from kldwrm_fast.optim.options import check_lr


class CompiledStep:
    """The compiled plain step (see :meth:`compiled_step`)."""

    _known_plain = False  # set by compiled_step around a step it knows to be plain
    _unmarked = True  # state tensors may be new since they were last marked static (see _before_traced_step)

    def compiled_step(self, **compile_options) -> Callable[..., Optional[Tensor]]:
        """:meth:`step`, with the plain steps (no statistics, no decomposition) run through
        ``torch.compile(self.step, fullgraph=True, **compile_options)``; statistics and inverse steps, and steps
        with a closure, run eagerly (they wait for the host: eigensolver flags, numerics checks). A plain step
        makes no host synchronisation (Note [numerics on the device] in :mod:`kldwrm_fast.optim.numerics`), so it
        traces into one graph; on CUDA, ``mode="reduce-overhead"`` replays it as a CUDA graph. Same results as
        :meth:`step` up to the compiler's reordering of float operations.

        torch.compile keeps a limited number of compiled versions per function
        (``torch._dynamo.config.recompile_limit``), and every optimizer's ``step`` is the same function to it;
        each instance takes two to four (the step counter's first value is specialised; Q's state gains keys
        over its first steps). When the limit is reached the plain steps run eagerly from then on, with
        one warning (the compiler raises before running anything, so no step is lost or taken twice). The step is
        traced with the PyTorch reference of the fused operations, whatever the backend: the Triton and CUDA ones
        are custom ops, whose float arguments (damping, Q's lr-dependent coefficient) the compiler would
        specialise, recompiling whenever one changes (see :class:`~kldwrm_fast.ops.operations.Operations`).

        With torch's default backend (inductor; ``mode`` and ``options`` as for ``torch.compile``) the compilation
        does not use AOTAutograd's cache: with torch 2.14, a graph loaded from it ignored a learning rate that
        changes between steps (a float the compiler turns into a graph input), so a second run trained with wrong
        steps, silently (reproduced by ``tests/optim/test_compiled_step.py``)."""
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
            check_lr(self.param_groups[0]["lr"])
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
        inside the traced ``step`` (writes into tensors are kept), so the device-side counters are made here, and
        the state follows the parameters here (a changed layout would be noticed in every trace and never
        recorded). Without this, rejected plain steps went uncounted and unreported when no eager plain step had
        made the counter (reproduced by ``tests/optim/test_compiled_step.py``).

        It also marks every state tensor and counter as a static address for the compiler. A CUDA graph
        (``mode="reduce-overhead"``) is only used for a graph whose mutated inputs are all static: torch marks a
        ``torch.optim`` optimizer's state itself only when the optimizer has an ``_init_group``, so without the
        marks the momentum buffers and counters the plain step updates in place made inductor skip the CUDA
        graph (``tests/optim/test_compiled_step.py`` reads inductor's own verdict on a CPU). The marks are
        unguarded (a replaced tensor makes the CUDA graph re-record, not the step recompile) and are made again
        only after an eager step, a change of layout or a ``load_state_dict``: the state is written in place
        (:func:`~kldwrm_fast.curvature.state.store`), so a plain step makes no new state tensor."""
        self._follow_parameters()
        counters = self._make_counters(self.estimator.device)
        if self._unmarked:
            for tensor in itertools.chain(counters, *(_tensors_of(state) for state in self.state.values())):
                torch._dynamo.mark_static_address(tensor)
            self._unmarked = False


class _InductorWithoutAutogradCache(torch._TorchCompileInductorWrapper):
    """torch.compile's default backend (inductor, with ``mode``, ``options`` and ``dynamic`` as there), compiling with
    AOTAutograd's cache off (see :meth:`CompiledStep.compiled_step`); the switch costs nothing per call. It is
    torch's own inductor wrapper, so the compiler treats it as inductor: a plain callable would make it specialise
    the learning rate and recompile whenever it changes."""

    def __call__(self, graph, example_inputs, **kwargs):
        with functorch_config.patch(enable_autograd_cache=False):
            return super().__call__(graph, example_inputs, **kwargs)


@torch._dynamo.disable
def run_eagerly(function: Callable, *args):
    """``function(*args)`` outside any torch.compile trace (a graph break where a trace reaches it)."""
    return function(*args)


def _tensors_of(state: dict) -> Iterator[Tensor]:
    return (value for value in state.values() if isinstance(value, Tensor))
