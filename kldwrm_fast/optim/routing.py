"""Parameters without a curvature block routed to a ``torch.optim`` optimizer of the user's choice (``others=``).

An LSTM's or GRU's weights, an embedding or a normalisation layer's affine parameters have no Kronecker block;
without routing they take plain gradient descent at the natural-gradient learning rate, which is the wrong scale
for them (an LSTM stays at chance at lr 0.03). With ``others=torch.optim.AdamW`` they are stepped by that optimizer
instead, inside the curvature optimizer's own ``step()``:

* its param groups are appended to the curvature optimizer's (the same dicts), so ``zero_grad()``, an LR scheduler
  and ``param_groups[i]["lr"] = ...`` act on both;
* it steps only when the curvature optimizer's step is taken: a step skipped for NaN or Inf (on the host, or on
  the device between statistics steps, read with one host synchronisation) leaves its parameters and state
  unchanged as well; under ``GradScaler`` its gradients are unscaled first;
* its ``state_dict`` travels inside the curvature optimizer's under ``"others"``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kldwrm_fast.optim.options import _check

OTHERS_KEY = "others"
"""The key of the routed optimizer's ``state_dict`` inside the curvature optimizer's."""


class RoutedParameters:
    """The routed optimizer of ``params`` (``(name, parameter)`` pairs), built as ``factory(parameters, **kwargs)``.

    Attributes:
        optimizer: the ``torch.optim.Optimizer`` built.
        names: the parameters' names, for the construction warning.
    """

    def __init__(self, params: list[tuple[str, Tensor]], factory: Callable, kwargs: Optional[dict]) -> None:
        _check(
            kwargs is None or isinstance(kwargs, dict),
            f"Invalid others_kwargs: {kwargs!r}; expected a dict of the others optimizer's arguments, or None",
        )
        self.names = [name for name, _ in params]
        self.kwargs = kwargs or {}
        self.optimizer = factory([p for _, p in params], **(kwargs or {}))
        _check(
            isinstance(self.optimizer, torch.optim.Optimizer),
            f"Invalid others: {factory!r} built a {type(self.optimizer).__name__}; expected a torch.optim.Optimizer "
            "class (e.g. torch.optim.AdamW) or a callable that returns one from a list of parameters",
        )

    @property
    def groups(self) -> list[dict]:
        """The routed optimizer's param groups (shared with the curvature optimizer's ``param_groups``)."""
        return self.optimizer.param_groups

    def describe(self) -> str:
        """``AdamW(lr=0.001)``: the optimizer and its arguments, for the construction warning."""
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{type(self.optimizer).__name__}({arguments})"

    def step(self, taken: bool, accepted: Optional[Tensor], grad_unscale: Optional[Tensor]) -> None:
        """Step the routed optimizer when the curvature optimizer's step was ``taken`` and, on a plain step decided
        on the device, ``accepted`` (one host synchronisation); gradients are first multiplied by ``grad_unscale``
        (a loss scaler's ``1/scale``) in place."""
        if not taken or (accepted is not None and not bool(accepted)):
            return
        if grad_unscale is not None:
            grads = [p.grad for group in self.groups for p in group["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, grad_unscale)
        self.optimizer.step()
