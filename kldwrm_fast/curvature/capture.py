"""Capture of layer inputs and output gradients from an ``nn.Module`` with hooks (SPEC §1, §4).

Every supported layer gets a forward hook that, on statistics steps only (``capture_due()``), in train
mode and with gradients enabled, keeps the layer input and puts a tensor hook on the layer output. The
tensor hook keeps output gradients either from the training loss's own backward (``fisher="empirical"``)
or from one extra ``torch.autograd.grad`` of a sampled loss taken in a forward hook on the root module
(``fisher="sampled"``), which leaves ``.grad`` untouched and retains the graph for the user's backward.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from kldwrm_fast.curvature.base import Curvature
from kldwrm_fast.curvature.blocks import KroneckerBlock
from kldwrm_fast.curvature.fisher import sampled_loss
from kldwrm_fast.curvature.layers import is_supported


def _discover(model: nn.Module) -> tuple[list[KroneckerBlock], list[tuple[str, Tensor]]]:
    blocks = [
        KroneckerBlock(name, module)
        for name, module in model.named_modules()
        if is_supported(module) and module.weight.requires_grad
    ]
    covered = {id(p) for block in blocks for p in block.params}
    others = [(name, p) for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    return blocks, others


class KroneckerCurvature(Curvature):
    """Kronecker blocks for every ``nn.Linear`` / ``nn.Conv2d`` (groups=1) of ``model``, with capture hooks.

    Statistics from several forward passes between two steps (gradient accumulation) are pooled: ``A`` over
    all rows, ``Γ`` as the sample-weighted mean of the per-pass factors. Training-loss gradients
    (``fisher="empirical"``) of k passes are taken to come from losses divided by k, as in the usual
    accumulation loop that makes ``.grad`` the mean gradient.
    """

    def __init__(self, model: nn.Module, fisher: str, predictive: str, seed: int) -> None:
        super().__init__()
        self.model = model
        self.fisher = fisher
        self.predictive = predictive
        self.blocks, self.other_params = _discover(model)
        if not self.blocks:
            raise ValueError(
                f"Invalid model: {type(model).__name__} has no trainable nn.Linear or nn.Conv2d (groups=1) layer"
            )
        self._seed = seed
        self._generator: torch.Generator | None = None
        # (block, layer output, its version when produced) awaiting the sampled backward of this forward.
        self._pending: list[tuple[KroneckerBlock, Tensor, int]] = []
        self._sampling = False
        self._paused = False
        self._passes = 0
        self._handles = [block.module.register_forward_hook(self._layer_hook(block)) for block in self.blocks]
        # Hooks are plain closures, not bound methods: copy.deepcopy(model) would deep-copy a bound method's
        # owner (this object) into the copy.
        self._handles.append(model.register_forward_hook(lambda *args: self._root_hook(*args)))

    def _capturing(self, module: nn.Module, output) -> bool:
        return (
            not self._paused
            and module.training
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and self.capture_due()
        )

    def _layer_hook(self, block: KroneckerBlock):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            # A deep copy of the model carries this hook along; its calls are not ours.
            if module is not block.module or not self._capturing(module, output):
                return
            block.inputs.append(inputs[0].detach())
            # A tensor hook sees the gradient of the output as the layer produced it, even if a later
            # in-place op (ReLU(inplace=True)) rewrites that tensor.
            output.register_hook(lambda grad: self._record(block, grad))
            if self.fisher == "sampled":
                self._pending.append((block, output, output._version))

        return hook

    def _record(self, block: KroneckerBlock, grad: Tensor) -> None:
        """Keep an output gradient from the right backward: the sampled one, or the training loss's."""
        if self._sampling == (self.fisher == "sampled"):
            block.output_grads.append(grad.detach())

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    def _root_hook(self, module: nn.Module, inputs: tuple, output) -> None:
        if module is not self.model:
            return
        if self._capturing(module, output) or self._pending:
            self._passes += 1
        if self.fisher == "sampled":
            self._sample(output)

    def forward_passes(self) -> int:
        return max(self._passes, 1)

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
        self._passes = 0

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
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
