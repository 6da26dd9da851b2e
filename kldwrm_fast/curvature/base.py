"""The interface between curvature sources and the optimizers."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from kldwrm_fast.curvature.blocks import DenseBlock, FactoredBlock


class Curvature:
    """A set of curvature blocks plus the parameters they do not cover.

    Attributes:
        blocks: the blocks, in a fixed order.
        other_params: ``(name, parameter)`` pairs outside every block (plain gradient descent).
        capture_due: called by capture hooks; True when the coming step collects statistics.
        shared_with_other_modules: ``"layer (with module, type)"`` for block parameters that another module also
            uses (a tied embedding): their curvature covers the layer's use only.
        own_forwards: ``"layer (class)"`` for layers whose class replaces ``nn.Linear``/``nn.Conv2d``'s forward:
            their curvature assumes ``y = W x̄``.
    """

    shared_with_other_modules: tuple[str, ...] | list[str] = ()
    own_forwards: tuple[str, ...] | list[str] = ()

    blocks: list[FactoredBlock]
    other_params: list[tuple[str, Tensor]]

    def __init__(self) -> None:
        self.capture_due: Callable[[], bool] = lambda: True

    def forward_passes(self) -> int:
        """Train-mode forward passes of the model captured since the last step (1 for sources without hooks)."""
        return 1

    def parameters(self) -> list[Tensor]:
        """Every optimised parameter once: block parameters first, then the others."""
        params = [p for block in self.blocks for p in block.params]
        return params + [p for _, p in self.other_params]

    def clear(self) -> None:
        """Drop what was captured since the last step."""
        for block in self.blocks:
            block.clear()

    def remove_hooks(self) -> None:
        """Detach from the model; a no-op for sources without hooks."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class DenseCurvature(Curvature):
    """One :class:`~kldwrm_fast.curvature.blocks.DenseBlock` over ``params`` (exact-curvature oracle)."""

    def __init__(self, params: list[Tensor], curvature_rows) -> None:
        super().__init__()
        self.blocks = [DenseBlock(params, curvature_rows)]
        self.other_params = []
