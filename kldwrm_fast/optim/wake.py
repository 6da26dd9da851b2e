"""The exact symmetric-KL wake objective Φ of QE-KLD-WRM (docs/algorithms.md §3 "QEKLDWRM", eqs. (31)/(35)).

    Φ(s) = Σ_blocks [⟨V_k, s⟩ + ½ ⟨s, Γ_k s A_k⟩] + λ_k Σ_i ζ(i) ρ^{k−i} D(θ_i, θ_k + s)

``D`` is the symmetric KL divergence between the predictive distributions of two parameter vectors,
averaged over the current mini-batch: categorical from logits (S99) or unit-variance Gaussian (33).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from kldwrm_fast.curvature.fisher import check_classes
from kldwrm_fast.ops import reference


def symmetric_kl_categorical(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Per-sample ``½ KL(p_a‖p_b) + ½ KL(p_b‖p_a)`` of softmax distributions, (batch, classes) → (batch,).

    Leading dimensions broadcast: a stack (n, batch, classes) against (batch, classes) gives (n, batch).
    """
    log_a = torch.log_softmax(logits_a, dim=-1)
    log_b = torch.log_softmax(logits_b, dim=-1)
    return 0.5 * ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(dim=-1)


def symmetric_kl_gaussian(mean_a: Tensor, mean_b: Tensor) -> Tensor:
    """Per-sample ``½ ‖h_a − h_b‖²`` (both KLs of unit-variance Gaussians agree), (batch, ...) → (batch,).

    A stack ``mean_a`` (n, batch, ...) against ``mean_b`` (batch, ...) gives (n, batch).
    """
    difference = mean_a - mean_b
    per_sample = difference.shape[: difference.dim() - mean_b.dim() + 1]
    return 0.5 * difference.pow(2).reshape(*per_sample, -1).sum(dim=-1)


def _check_logits(output: Tensor, predictive: str) -> None:
    check_classes(output, predictive)
    if predictive == "categorical" and output.dim() != 2:
        raise ValueError(
            "QEKLDWRM with predictive='categorical' needs model outputs of shape (batch, classes) "
            f"(logits); got shape {tuple(output.shape)}"
        )


def symmetric_kl(output_a: Tensor, output_b: Tensor, predictive: str) -> Tensor:
    """Mean over the batch of the per-sample symmetric KL for ``predictive``."""
    return stored_divergences(output_a.unsqueeze(0), output_b, predictive)[0]


def stored_divergences(stored: Tensor, output: Tensor, predictive: str) -> Tensor:
    """Batch-mean symmetric KL of each of a stack of outputs (n, batch, ...) against ``output`` → (n,).

    One pass over the stack (a handful of operations whatever n is), the same per-element arithmetic as
    one :func:`symmetric_kl` per stored output.
    """
    _check_logits(output, predictive)
    if predictive == "categorical":
        return symmetric_kl_categorical(stored, output).mean(dim=-1)
    return symmetric_kl_gaussian(stored, output).mean(dim=-1)


class WakeObjective:
    """Φ for one step, with the stored networks' outputs computed once.

    Args:
        model: the network; evaluated functionally at ``θ_k + s`` (nothing is copied).
        blocks: the curvature blocks whose parameters ``s`` moves (block form, one matrix per block).
        names: parameter name of every tensor in ``blocks[*].params`` (by identity).
        gradients: ``V_k`` per block, (n_out, n_in).
        local_factors: ``(A_k, Γ_k)`` per block, the step's local factors in the sense of eq. (20).
        targets: outputs of the stored networks ``h(θ_i)`` on the batch, detached (stacked here once).
        weights: ``λ_k ζ(i) ρ^{k−i}`` per stored network.
        inputs: ``(args, kwargs)`` of the model call that produced the current mini-batch.
        predictive: ``"categorical"`` or ``"gaussian"``.
        reduce: applied in place to each inner gradient (data parallel: the average over ranks), or None.
    """

    def __init__(
        self, model, blocks, names, gradients, local_factors, targets, weights, inputs, predictive, reduce=None
    ):
        self.model, self.blocks, self.names = model, blocks, names
        self.gradients, self.local_factors = gradients, local_factors
        self.stored = torch.stack(targets) if targets else None
        self.weights = _beside(weights, self.stored) if targets else None
        self.args, self.kwargs = inputs
        self.predictive = predictive
        self.reduce = reduce

    def output_at(self, steps: list[Tensor]) -> Tensor:
        """Model output at ``θ_k + s``, differentiable in ``steps``."""
        params = {}
        for block, step in zip(self.blocks, steps):
            for param, part in zip(block.params, block.unflatten(step)):
                # Half-precision parameters: the step (float32 state) is added in the parameter dtype, as the
                # update itself will be, so that the forward runs in the model's own precision.
                params[self.names[id(param)]] = param.detach() + part.to(param.dtype)
        return functional_call(self.model, params, self.args, self.kwargs)

    def divergence(self, steps: list[Tensor]) -> Optional[Tensor]:
        """Φ's KL term ``λ Σ_i ζ(i) ρ^{k−i} D(θ_i, θ_k + s)`` as a scalar tensor (differentiable in ``steps``); None
        without stored networks."""
        if self.stored is None:
            return None
        output = self.output_at(steps)
        return (stored_divergences(self.stored, output, self.predictive) * self.weights).sum()

    def value(self, steps: list[Tensor]) -> Tensor:
        """Φ(s) as a scalar tensor (differentiable in ``steps``)."""
        total = 0.0
        for v, s, (a, g) in zip(self.gradients, steps, self.local_factors):
            total = total + (v * s).sum() + 0.5 * (s * reference.sandwich(g, s, a)).sum()
        divergence = self.divergence(steps)
        return total if divergence is None else total + divergence

    def gradient(self, steps: list[Tensor]) -> list[Tensor]:
        """∇Φ(s) per block: ``V + Γ s A`` (Γ and A are symmetric) plus the KL term's gradient, by autograd through
        the functional forward pass. Two GEMMs per block for the quadratic term, where autograd through
        ``½⟨s, Γ s A⟩`` takes four; and no forward pass without stored networks."""
        gradients = [v + reference.sandwich(g, s, a) for v, s, (a, g) in zip(self.gradients, steps, self.local_factors)]
        with torch.enable_grad():
            leaves = [s.detach().requires_grad_() for s in steps]
            divergence = self.divergence(leaves)
            if divergence is None:
                return gradients
            kl = torch.autograd.grad(divergence, leaves, allow_unused=True, materialize_grads=True)
        return [gradient.add_(part) for gradient, part in zip(gradients, kl)]

    def minimise(self, steps: list[Tensor], n_steps: int, lr: float) -> list[Tensor]:
        """``n_steps`` of plain gradient descent with learning rate ``lr`` from ``steps``."""
        current = [s.detach().clone() for s in steps]
        for _ in range(n_steps):
            gradients = self.gradient(current)
            if self.reduce is not None:
                self.reduce(gradients)
            for s, g in zip(current, gradients):
                s.sub_(g, alpha=lr)
        return current


def _beside(values: list[float], like: Tensor) -> Tensor:
    """``values`` as a tensor of ``like``'s dtype and device without stalling the host: on CUDA through pinned
    memory and an asynchronous copy (a plain ``torch.tensor(..., device=...)`` waits for the stream)."""
    return torch.tensor(values, dtype=like.dtype, pin_memory=like.is_cuda).to(like.device, non_blocking=True)


def stored_outputs(model: nn.Module, names: list[str], snapshots: list[list[Tensor]], inputs) -> list[Tensor]:
    """Outputs of the model at each snapshot (a list of parameter tensors aligned with ``names``)."""
    args, kwargs = inputs
    with torch.no_grad():
        return [functional_call(model, dict(zip(names, values)), args, kwargs) for values in snapshots]
