"""EA-KFAC, the paper's baseline, with the semantics of its reference code (docs/algorithms.md §3 "KFAC")."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from kldwrm_fast.curvature import Curvature
from kldwrm_fast.ops import reference
from kldwrm_fast.optim.arguments import _check, validate_positive_or_none
from kldwrm_fast.optim.base import CurvatureOptimizer


class KFAC(CurvatureOptimizer):
    """K-FAC with exponentially averaged Kronecker factors, KL clipping and heavy-ball momentum.

    Per block: ``d = P_{Ā,Γ̄}(V)``; ``ν = min(1, sqrt(kl_clip / (lr² Σ ⟨d, V⟩)))``; ``d ← ν d``;
    ``buf ← μ buf + d``; ``W̄ ← W̄ − lr (1−μ) buf``.

    Args:
        model: the network (hooks are registered on its Linear/Conv2d layers) or a prebuilt ``Curvature``.
        lr: learning rate ``1/λ``, read from the param group at every step (schedulers work).
        rho: decay ρ ∈ [0, 1) of the factor averages.
        damping: δ ≥ 0 added to the eigenvalue products.
        momentum: μ ∈ [0, 1).
        kl_clip: KL clipping threshold > 0, or None.
        weight_decay: added to the gradient, bias included.
        stat_freq, inv_freq: statistics / eigendecomposition cadence (see Note [step cadence]).
        fisher: ``"sampled"`` (labels from the model) or ``"empirical"`` (the training loss's backward).
        predictive: ``"categorical"`` (logits) or ``"gaussian"`` (unit-variance regression).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        bias: ``"folded"`` (the bias is the weight matrix's last column) or ``"separate"`` (each bias is a block
            of its own with input factor ``[[1]]``, as in the paper's code).
        eigenvalue_floor: eigenvalues below it are set to 0 before damping (the paper's code: 1e-6).
        repeated_calls: ``"expand"`` or ``"reduce"``: how a layer's calls within one forward pass combine
            (Note [repeated calls] in :mod:`kldwrm_fast.curvature.blocks`).
        predictive_module: the module whose output the loss reads, when ``model`` is part of it (the sampled
            Fisher draws its labels there); default ``model``.
        others, others_kwargs: a ``torch.optim`` optimizer class (and its arguments) for the parameters without a
            curvature block (:mod:`kldwrm_fast.optim.routing`); default plain gradient descent.
    """

    _kl_clip_checks_gradients = True

    def __init__(
        self,
        model: Union[nn.Module, Curvature],
        lr: float = 0.01,
        rho: float = 0.95,
        damping: float = 0.01,
        momentum: float = 0.9,
        kl_clip: Optional[float] = 0.1,
        weight_decay: float = 0.0,
        stat_freq: int = 30,
        inv_freq: int = 30,
        fisher: str = "sampled",
        predictive: str = "categorical",
        backend: str = "auto",
        bias: str = "folded",
        eigenvalue_floor: float = 0.0,
        repeated_calls: str = "expand",
        predictive_module: Optional[nn.Module] = None,
        others: Optional[Callable] = None,
        others_kwargs: Optional[dict] = None,
    ) -> None:
        _check(
            isinstance(momentum, (int, float)) and 0 <= momentum < 1,
            f"Invalid momentum: {momentum!r}; expected 0 <= momentum < 1",
        )
        validate_positive_or_none("kl_clip", kl_clip)
        defaults = dict(
            lr=lr, rho=rho, damping=damping, momentum=momentum, kl_clip=kl_clip,
            weight_decay=weight_decay, stat_freq=stat_freq, inv_freq=inv_freq, eigenvalue_floor=eigenvalue_floor,
        )  # fmt: skip
        super().__init__(
            model, defaults, fisher, predictive, backend, bias,
            repeated_calls=repeated_calls, predictive_module=predictive_module, others=others,
            others_kwargs=others_kwargs,
        )  # fmt: skip
        self._views: dict[int, tuple[Tensor, list[Tensor]]] = {}  # see _parameter_views

    def _update(self, group, blocks, grads, info):
        lr = info.lr
        self.estimator.refresh(blocks, info, group["rho"], reweight=None)
        states = [self.block_state(block) for block in blocks]
        directions = info.batches.precondition(self._ops, states, grads, group["damping"])
        if not self._kl_clipped_and_finite(directions, grads, lr, group):
            return
        momentum = group["momentum"]
        if not momentum:
            self._add_to_parameters(blocks, directions, -lr)
            return
        buffers = []
        for state, d in zip(states, directions):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(d)
            buffers.append(state["momentum_buffer"])
        self._heavy_ball(buffers, directions, momentum)
        self._add_buffers_to_parameters(blocks, buffers, -lr * (1.0 - momentum))

    def _heavy_ball(self, buffers: list[Tensor], directions: list[Tensor], momentum: float) -> None:
        """``buf ← μ buf + d`` for every block in multi-tensor operations.

        A plain step rejected on the device (Note [numerics on the device]) keeps the buffers as they were: the
        directions are zeroed first (they may hold NaN) and the buffers are scaled by 1 instead of μ. The factor
        is made in each buffer's dtype: an accepted step rounds as the unmasked one does, and on CUDA the
        multi-tensor kernels take their one-launch path only when the factor's dtype is the tensors'.
        """
        accepted = self._now.accepted
        if accepted is None:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, directions)
            return
        for d in directions:
            self._masked(d)
        for dtype, members in _by_dtype(buffers).items():
            same = [buffers[i] for i in members]
            kept = torch.full((), momentum, dtype=dtype, device=accepted.device)
            torch._foreach_mul_(same, torch.where(accepted, kept, 1.0))
            torch._foreach_add_(same, [directions[i] for i in members])

    def _add_buffers_to_parameters(self, blocks, buffers: list[Tensor], alpha: float) -> None:
        """``W̄ ← W̄ + alpha · buf`` for every block in one multi-tensor operation (none moves on a plain step
        rejected on the device: the buffers are multiplied by the verdict first, in their dtype). The buffers'
        views shaped as the parameters are made once per buffer (:meth:`_parameter_views`)."""
        params, parts = [], []
        for block, buffer in zip(blocks, buffers, strict=True):
            params += block.params
            parts += self._parameter_views(block, buffer)
        if self._now.accepted is not None:
            for dtype, members in _by_dtype(parts).items():
                products = torch._foreach_mul([parts[i] for i in members], self._now.accepted.to(dtype))
                for i, product in zip(members, products):
                    parts[i] = product
        reference.scaled_add_(params, parts, alpha)

    def _parameter_views(self, block, buffer: Tensor) -> list[Tensor]:
        """``block.unflatten(buffer)``, kept while ``buffer`` is the block's momentum buffer (it is updated in place;
        ``load_state_dict`` or a move of the model replaces it). Made afresh where they would not be views of the
        buffer, and while torch.compile traces (there views cost nothing)."""
        if torch.compiler.is_compiling():
            return block.unflatten(buffer)
        cached = self._views.get(id(block))
        if cached is None or cached[0] is not buffer:
            parts = block.unflatten(buffer)
            storage = buffer.untyped_storage().data_ptr()
            if not all(part.untyped_storage().data_ptr() == storage for part in parts):
                return parts
            cached = (buffer, parts)
            self._views[id(block)] = cached
        return cached[1]


def _by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[int]]:
    """The indices of ``tensors`` grouped by dtype."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault(tensor.dtype, []).append(i)
    return groups
