"""Capture of layer inputs and output gradients from an ``nn.Module`` with hooks (docs/algorithms.md §1, §4).

The hooks are excluded from ``torch.compile`` (``torch._dynamo.disable``): in a compiled model each runs eagerly
at a graph break. Traced, they lost statistics with the sampled Fisher (``tests/optim/test_compiled_model.py``).

Every supported layer gets a forward hook that, on statistics steps only (``capture_due()``), in train
mode and with gradients enabled, keeps the layer input and puts a tensor hook on the layer output. The
tensor hook keeps output gradients either from the training loss's own backward (``fisher="empirical"``)
or from one extra ``torch.autograd.grad`` of a sampled loss taken in a forward hook on the root module
(``fisher="sampled"``), which leaves ``.grad`` untouched and retains the graph for the user's backward.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kldwrm_fast.curvature.attention import ProjectionBlock, ProjectionCalls, attention_blocks
from kldwrm_fast.curvature.base import Curvature
from kldwrm_fast.curvature.blocks import BiasBlock, EmbeddingBlock, FactoredBlock, KroneckerBlock, NormBlock
from kldwrm_fast.curvature.fisher import sampled_loss
from kldwrm_fast.curvature.layers import NORMALISATIONS, is_normalisation, is_supported
from kldwrm_fast.curvature.state import INPUT, OUTPUT, SIDES


def _attention_projections(model: nn.Module) -> set[int]:
    """Linear modules whose weights ``nn.MultiheadAttention`` uses without calling them (its ``out_proj``): their
    blocks are the attention module's (:mod:`kldwrm_fast.curvature.attention`), not a Linear layer's."""
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def _computed_parameters(module: nn.Module) -> bool:
    """Whether the layer's weight or bias is computed from other parameters (``torch.nn.utils.parametrize``, so
    ``weight_norm`` and ``spectral_norm``, or the older hook-based ``weight_norm``) instead of being its own
    parameter: the optimizer cannot update it, so the parameters behind it take plain gradient descent. Reads no
    parametrized attribute (``spectral_norm`` would run a power iteration on access)."""
    if parametrize.is_parametrized(module):
        return True
    own = module._parameters
    bias = getattr(module, "bias", None)
    return not isinstance(own.get("weight"), nn.Parameter) or (own.get("bias") is None and bias is not None)


def _uses_elsewhere(model: nn.Module, blocks: list[FactoredBlock]) -> list[str]:
    """``"layer (with module)"`` for each block parameter that another module also holds as its own parameter and
    uses without the block's layer (a tied embedding and output layer): the curvature sees only the layer's use."""
    layers_of = {
        id(p): (block, block.partner.modules if isinstance(block, BiasBlock) else block.modules)
        for block in blocks
        for p in block.params
    }
    found = []
    for name, module in model.named_modules():
        for param in module._parameters.values():
            block, layers = layers_of.get(id(param), (None, ()))
            if block is not None and all(module is not layer for layer in layers):
                found.append(f"{block.name} (with {name}, {type(module).__name__})")
                break
    return found


def _own_forwards(blocks: list[FactoredBlock]) -> list[str]:
    """``"layer (class)"`` for each layer of a subclass of a supported layer that replaces how the output is computed
    (``forward``, or a convolution's ``_conv_forward``): the curvature assumes the base class's ``y = W x̄`` (or
    ``γ ⊙ x̂ + β``), which such a forward may not compute (a scaled weight, say)."""
    found = []
    for block in blocks:
        if not isinstance(block, KroneckerBlock) or isinstance(block, ProjectionBlock):
            continue
        cls = type(block.module)
        base = next((kind for kind in OWN_FORWARD_BASES if isinstance(block.module, kind)), None)
        if base is not None:
            own = cls.forward is not base.forward
        else:
            own = cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward
        if own:
            found.append(f"{block.name} ({cls.__name__})")
    return found


OWN_FORWARD_BASES = (nn.Linear, nn.Embedding, nn.SyncBatchNorm, *NORMALISATIONS)
"""The classes whose ``forward`` a block assumes, the first that matches (``SyncBatchNorm`` before ``_BatchNorm``,
whose forward it replaces; a convolution's, ``_conv_forward`` too, is checked apart)."""


def _same_layer(first: nn.Module, second: nn.Module) -> bool:
    """Whether two modules with one weight compute the same function of their inputs (so one block fits both)."""
    if type(first) is not type(second) or getattr(first, "bias", None) is not getattr(second, "bias", None):
        return False
    if isinstance(first, nn.Embedding):
        return first.padding_idx == second.padding_idx and first.max_norm == second.max_norm
    if isinstance(first, nn.Conv2d):
        settings = ("stride", "padding", "dilation", "padding_mode")
        return all(getattr(first, name) == getattr(second, name) for name in settings)
    return True


def _discover(model: nn.Module, separate_bias: bool = False) -> tuple[list[FactoredBlock], list[tuple[str, Tensor]]]:
    """One block per trainable weight of the supported layers; layers that share their weight and bias (and, for
    convolutions, their settings) share one block, which pools their statistics. With ``separate_bias`` each
    trainable bias is a :class:`BiasBlock` right after its weight's block."""
    skipped = _attention_projections(model)
    by_weight: dict[int, KroneckerBlock] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.MultiheadAttention):
            for block in attention_blocks(name, module):
                by_weight.setdefault(id(block.params[0]), block)  # (a module listed twice: its first name)
            continue
        if not is_supported(module) or id(module) in skipped or _computed_parameters(module):
            continue  # (the parametrized weight is not read: see _computed_parameters)
        if not module.weight.requires_grad:
            continue
        block = by_weight.get(id(module.weight))
        if block is None:
            by_weight[id(module.weight)] = _block_for(name, module, separate_bias)
        elif _tied_across_kinds(block.module, module):
            if isinstance(block, EmbeddingBlock):  # Note [a tied embedding and output layer]
                by_weight[id(module.weight)] = _block_for(name, module, separate_bias)
        elif all(module is not m for m in block.modules):
            if not _same_layer(block.module, module):
                raise ValueError(
                    f"Invalid model: layers {block.name!r} and {name!r} share their weight but not their bias or "
                    "settings; share both (one block pools their statistics) or neither"
                )
            block.modules.append(module)
    blocks: list[FactoredBlock] = []
    for block in by_weight.values():
        blocks.append(block)
        bias = getattr(block.module, "bias", None)
        if separate_bias and type(block) is KroneckerBlock and bias is not None and bias.requires_grad:
            blocks.append(BiasBlock(block))
    owners: dict[int, str] = {}
    for block in blocks:
        for param in block.params[1:] if isinstance(block, KroneckerBlock) else block.params:
            if owners.setdefault(id(param), block.name) != block.name:
                raise ValueError(
                    f"Invalid model: layers {owners[id(param)]!r} and {block.name!r} share their bias but not their "
                    "weight; share both (one block pools their statistics) or neither"
                )
    covered = {id(p) for block in blocks for p in block.params}
    others = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    return blocks, others


def _block_for(name: str, module: nn.Module, separate_bias: bool) -> KroneckerBlock:
    if is_normalisation(module):
        return NormBlock(name, module)
    if not isinstance(module, nn.Embedding):
        return KroneckerBlock(name, module, fold_bias=not separate_bias)
    refused = (
        ("sparse", "sparse gradients have no block form"),
        ("scale_grad_by_freq", "its gradient is rescaled past what the curvature describes"),
    )
    for setting, why in refused:
        if getattr(module, setting):
            raise ValueError(f"Invalid model: embedding {name!r} has {setting}=True ({why}); build it with "
                             f"{setting}=False")  # fmt: skip
    return EmbeddingBlock(name, module)


def _tied_across_kinds(first: nn.Module, second: nn.Module) -> bool:
    """Note [a tied embedding and output layer]
        A language model's embedding and output layer often hold one weight. One block fits one of them: the output
        layer's, whose output gradients reach every row of the weight at every step (the embedding's reach only the
        tokens a batch holds), and which carries its bias. The construction notice on tied weights names the
        embedding's use, which its curvature leaves out.

    Whether two modules holding one weight are an embedding and a Linear layer."""
    return isinstance(first, nn.Embedding) != isinstance(second, nn.Embedding)


def diagonal_sides(block: FactoredBlock, max_factor_dim: int | None) -> tuple[str, ...]:
    """The sides of ``block`` kept diagonal: those its kind always keeps so (an embedding's input side) and those wider
    than ``max_factor_dim`` (None: none)."""
    wide = {side for side, n in zip((OUTPUT, INPUT), block.shape) if max_factor_dim is not None and n > max_factor_dim}
    return tuple(side for side in SIDES if side in wide or side in block.diagonal)


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "FullyShardedDataParallel")
"""Modules that run another and return its output as it is: an enclosing one is not a consumer of the output."""

_MODULE_CALL = (os.path.join("torch", "nn", "modules", "module.py"), "_call_impl")


def enclosing_modules(root: nn.Module) -> list[nn.Module]:
    """The modules whose forward is running now around ``root``'s, innermost first (read from the interpreter's
    frames of ``nn.Module._call_impl``; wrappers such as DistributedDataParallel and torch.compile's left out)."""
    found, frame = [], sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == _MODULE_CALL[1] and code.co_filename.endswith(_MODULE_CALL[0]):
            module = frame.f_locals.get("self")
            if isinstance(module, nn.Module) and module is not root and type(module).__name__ not in _WRAPPERS:
                found.append(module)
        frame = frame.f_back
    return found


class KroneckerCurvature(Curvature):
    """Kronecker blocks for every ``nn.Linear`` / ``nn.Conv2d`` (groups=1) of ``model``, with capture hooks.

    Statistics from several forward passes between two steps (gradient accumulation) are pooled: ``A`` over
    all rows, ``Γ`` as the sample-weighted mean of the per-pass factors. Training-loss gradients
    (``fisher="empirical"``) of k passes are taken to come from losses divided by k, as in the usual
    accumulation loop that makes ``.grad`` the mean gradient. Calls of a layer within one forward pass are weight
    sharing, combined as ``repeated_calls`` says (Note [repeated calls] in :mod:`kldwrm_fast.curvature.blocks`).

    The sampled Fisher (and QE's KL terms, ``needs_predictive_output``) read ``predictive_module``'s output (default
    ``model``) as the ``predictive`` distribution's parameters. When ``model`` is left at that and turns out, at its
    first captured forward, to run inside another module that transforms its output (an optimizer built from
    ``model.encoder``), that module's forward raises one line (Note [the output the sampled Fisher reads]).
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: str,
        predictive: str,
        seed: int,
        separate_bias: bool = False,
        repeated_calls: str = "expand",
        predictive_module: nn.Module | None = None,
        needs_predictive_output: bool = False,
        weight_sharing: str = "expand",
        max_factor_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.fisher = fisher
        self.predictive = predictive
        self.output_module = model if predictive_module is None else predictive_module
        # Whether the first captured forward still has to show that no module around the model transforms its output.
        self._check_enclosing = predictive_module is None and (fisher == "sampled" or needs_predictive_output)
        self.blocks, self.other_params = _discover(model, separate_bias)
        for block in self.blocks:
            if isinstance(block, KroneckerBlock):
                block.repeated_calls = repeated_calls
                block.weight_sharing = weight_sharing
            block.diagonal = diagonal_sides(block, max_factor_dim)
        self.shared_with_other_modules = _uses_elsewhere(model, self.blocks)
        self.own_forwards = _own_forwards(self.blocks)
        if not self.blocks:
            raise ValueError(
                f"Invalid model: {type(model).__name__} has no trainable nn.Linear, nn.Conv2d (groups=1), nn.Embedding "
                "or affine normalisation layer"
            )
        self._seed = seed
        self._generator: torch.Generator | None = None
        # (block, layer output, its version when produced) awaiting the sampled backward of this forward.
        self._pending: list[tuple[KroneckerBlock, Tensor, int]] = []
        self._sampling = False
        self._paused = False
        self._forwards = 0  # root forward calls so far: the id of the pass in progress
        self._passes: set[int] = set()  # ids of the passes whose output gradients were recorded
        self._hooked: set[str] = set()  # blocks captured in a forward since the last step
        self._warned_recomputed: set[str] = set()
        self._latest_output = lambda: None  # (a weak reference to) the output of the last captured forward
        self._watching: dict = {}  # id(enclosing module) -> its one-time hook (Note [the output the sampled ...])
        self._handles = [
            module.register_forward_hook(torch._dynamo.disable(self._layer_hook(block, module)))
            for block in self.blocks
            if not isinstance(block, ProjectionBlock)
            for module in block.modules
        ]
        self._projection_calls = ProjectionCalls(lambda *args: self._watch(*args))
        attention: dict[int, tuple[nn.Module, list[ProjectionBlock]]] = {}
        for block in self.blocks:
            if isinstance(block, ProjectionBlock):
                attention.setdefault(id(block.module), (block.module, []))[1].append(block)
        for module, projections in attention.values():
            enter, leave = self._attention_hooks(module, projections)
            self._handles.append(module.register_forward_pre_hook(torch._dynamo.disable(enter), with_kwargs=True))
            self._handles.append(module.register_forward_hook(torch._dynamo.disable(leave), always_call=True))
        # Hooks are plain closures, not bound methods: copy.deepcopy(model) would deep-copy a bound method's
        # owner (this object) into the copy.
        self._handles.append(
            self.output_module.register_forward_hook(torch._dynamo.disable(lambda *args: self._root_hook(*args)))
        )

    def _capturing(self, module: nn.Module, output) -> bool:
        return (
            not self._paused
            and module.training
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and self.capture_due()
        )

    def _layer_hook(self, block: KroneckerBlock, layer: nn.Module):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # A deep copy of the model carries this hook along; its calls are not ours.
            if module is not layer or not self._capturing(module, output):
                return
            if torch._C._current_graph_task_id() != -1:  # activation checkpointing recomputes inside a backward
                if block.name not in self._hooked:
                    self._recomputed(block)
                return
            self._watch(block, inputs[0].detach(), output)

        return hook

    def _watch(self, block: KroneckerBlock, x: Tensor, output: Tensor, arrange=None) -> None:
        """Capture one call of a layer: its input ``x`` and, once it arrives, the gradient of ``output`` (made batch-
        first by ``arrange`` for an attention projection). The input is kept only once its output gradient arrives,
        so that a forward without a backward (a training metric, say) adds no unmatched rows. A tensor hook sees the
        gradient of the output as the layer produced it, even if a later in-place op (ReLU(inplace=True)) rewrites
        that tensor."""
        self._hooked.add(block.name)
        forward, slot = self._forwards, []
        if arrange is None:
            output.register_hook(lambda grad: self._record(block, x, grad, forward, slot))
        else:
            output.register_hook(lambda grad: self._record(block, x, arrange(grad), forward, slot))
        if self.fisher == "sampled":
            self._pending.append((block, output, output._version))

    def _attention_hooks(self, attention: nn.Module, blocks: list[ProjectionBlock]):
        """The forward pre-hook and hook of one attention module (Note [attention projections] in
        :mod:`kldwrm_fast.curvature.attention`)."""
        entered: list[bool] = []

        def enter(module, args: tuple, kwargs: dict) -> None:
            if module is not attention or self._paused or not module.training or not torch.is_grad_enabled():
                return
            if not self.capture_due():
                return
            if torch._C._current_graph_task_id() != -1:  # activation checkpointing recomputes inside a backward
                for block in blocks:
                    if block.name not in self._hooked:
                        self._recomputed(block)
                return
            query = args[0] if args else kwargs["query"]
            self._projection_calls.enter(blocks, query, module.batch_first)
            entered.append(True)

        def leave(module, args, output) -> None:
            if module is not attention or not entered:
                return
            entered.pop()
            for block in self._projection_calls.exit(blocks):
                if block.weight is getattr(module, "in_proj_weight", None):
                    block.why_plain = (
                        f"layer {block.name!r} ran with a query other than its key (cross-attention): the rows of "
                        "the packed in_proj_weight then see different inputs, which one Kronecker block cannot "
                        "describe, so it takes plain gradient descent"
                    )

        return enter, leave

    def _recomputed(self, block: KroneckerBlock) -> None:
        """A layer whose forward ran inside a backward pass without having been captured in a forward before:
        reentrant activation checkpointing (its first forward ran without gradients). Nothing is captured there:
        the sampled Fisher's backward has already run, and the training loss's would be counted as another pass
        (non-reentrant checkpointing recomputes inside the backward too, after a forward that was captured).
        Warned once per layer."""
        if block.name in self._warned_recomputed:
            return
        self._warned_recomputed.add(block.name)
        warnings.warn(
            f"layer {block.name!r} ran its forward inside a backward pass (reentrant activation checkpointing, "
            "torch.utils.checkpoint(..., use_reentrant=True)), where its statistics cannot be captured, so it gets "
            "no curvature; checkpoint with use_reentrant=False",
            UserWarning,
            stacklevel=2,
        )

    def _record(self, block: KroneckerBlock, x: Tensor, grad: Tensor, forward: int, slot: list[int]) -> None:
        """Keep an input with its output gradient from the right backward: the sampled one, or the training
        loss's. ``slot`` belongs to one call of the layer: a second backward through the same forward (two losses
        with a backward each) adds its gradient to the first one's pair, so that the statistics are those of the
        summed loss whose gradient ``.grad`` holds (with ``fisher="empirical"`` every backward through the forward
        counts as the training loss's)."""
        if self._sampling != (self.fisher == "sampled"):
            return
        if slot and slot[0] < len(block.inputs) and block.inputs[slot[0]] is x:
            block.output_grads[slot[0]] = block.output_grads[slot[0]] + grad.detach()
            return
        slot[:] = [len(block.inputs)]
        block.inputs.append(x)
        block.output_grads.append(grad.detach())
        # Calls of one forward pass, differentiated by one backward, are one pass of a weight-shared layer; a
        # new root forward, or a backward of its own (a forward called without the root's hooks), is a new pass.
        block.passes.append((forward, torch._C._current_graph_task_id()))
        self._passes.add(forward)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def _root_hook(self, module: nn.Module, inputs: tuple, output) -> None:
        if module is not self.output_module:
            return
        if self._check_enclosing and self._hooked:
            if isinstance(output, Tensor):
                self._latest_output = weakref.ref(output)
            if not self._watching:
                self._watch_enclosing()
        if self.fisher == "sampled":
            self._sample(output)
        self._forwards += 1

    def _watch_enclosing(self) -> None:
        """Note [the output the sampled Fisher reads]
            The sampled Fisher draws labels from the output of the module the optimizer was built from, and QE
            measures its KL terms there: both take that output for the parameters of ``predictive``. An optimizer
            built from a submodule (``KFAC(model.encoder)``) would treat hidden states as logits, silently. At the
            first captured forward, every module whose forward runs around the model's (from the interpreter's
            frames) gets a one-time hook. A forward hook added while its module runs first fires at its next
            forward, so at the end of the second captured forward: if the module returns anything but the
            model's output of that forward itself (a wrapper that passes it through is fine), it raises, and at
            every forward after, naming the two ways out: ``predictive_module=`` the module
            whose output the loss reads, or ``fisher="empirical"`` (KFAC, SO, Q). A head applied to the output
            outside any module (a function in the training loop) cannot be seen this way."""
        outers = enclosing_modules(self.output_module)
        if not outers:
            self._check_enclosing = False
            return
        self._watching = {
            id(outer): outer.register_forward_hook(torch._dynamo.disable(self._enclosing_check(outer)))
            for outer in outers
        }

    def _enclosing_check(self, outer: nn.Module):
        """The one-time forward hook on ``outer`` (Note [the output the sampled Fisher reads])."""

        def check(module, inputs, result) -> None:
            if module is not outer or id(outer) not in self._watching:
                return
            if result is not self._latest_output():  # the hooks stay: every later forward is refused too
                raise ValueError(
                    f"Invalid model: the optimizer reads the output of {type(self.model).__name__} as "
                    f"{self.predictive} outputs (fisher={self.fisher!r}), but it runs inside "
                    f"{type(outer).__name__}, which transforms that output; pass predictive_module=<the "
                    f"{type(outer).__name__}> whose output the loss reads, or fisher='empirical'"
                )
            self._watching.pop(id(outer)).remove()
            if not self._watching:
                self._check_enclosing = False

        return check

    def forward_passes(self) -> int:
        """Forward passes whose output gradients were recorded since the last step (at least 1)."""
        return max(len(self._passes), 1)

    def _sample(self, output) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                f"fisher='sampled' needs the model to return one tensor of {self.predictive} outputs, got "
                f"{type(output).__name__}; return a tensor or use fisher='empirical'"
            )
        loss = sampled_loss(output, self.predictive, self._generator_for(output.device))
        # Differentiating to the layer outputs (where the tensor hooks record) stops the backward at the
        # first layer and skips every weight-gradient product; an output rewritten in place since (its
        # version moved) no longer stands for the layer's output, so its weight is the target instead.
        # autograd.grad leaves .grad alone.
        targets = {}
        for block, output, version in pending:
            target = output if output._version == version else block.params[0]
            targets[id(target)] = target
        self._sampling = True
        try:
            torch.autograd.grad(loss, list(targets.values()), retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False

    @contextlib.contextmanager
    def paused(self):
        """Forward passes inside this context collect no statistics (e.g. the optimizer's own passes)."""
        previous, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = previous

    def clear(self) -> None:
        super().clear()
        self._pending = []
        self._passes = set()
        self._hooked = set()

    def remove_hooks(self) -> None:
        for handle in [*self._handles, *self._watching.values()]:
            handle.remove()
        self._handles, self._watching = [], {}
        self.clear()

    def state_dict(self) -> dict:
        state = {"seed": self._seed}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
            state["generator_device"] = str(self._generator.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self._seed = state["seed"]
        self._generator = None
        if "generator" in state:
            self._generator = torch.Generator(device=state["generator_device"])
            self._generator.set_state(state["generator"])
