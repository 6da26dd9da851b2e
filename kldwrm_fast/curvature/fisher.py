"""Losses whose output-gradients give the sampled Fisher statistics (docs/algorithms.md §4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FISHER_TYPES = ("sampled", "empirical")
PREDICTIVES = ("categorical", "gaussian")


def check_classes(output: Tensor, predictive: str) -> None:
    """A categorical predictive needs at least two logits per sample (one class has a constant likelihood, so
    its Fisher is 0)."""
    if predictive == "categorical" and output.shape[-1] < 2:
        raise ValueError(
            f"predictive='categorical' needs at least two classes (logits of shape (batch, classes >= 2)), got "
            f"shape {tuple(output.shape)}; for one output use predictive='gaussian' or two logits"
        )


def sampled_loss(output: Tensor, predictive: str, generator: torch.Generator) -> Tensor:
    """Mean negative log-likelihood of targets drawn from the model's own predictive distribution.

    Args:
        output: model output, (..., classes) logits for ``"categorical"`` or (..., d) means for
            ``"gaussian"`` (unit variance); leading dimensions are flattened into samples.
        predictive: ``"categorical"`` or ``"gaussian"``.
        generator: source of the sampled targets, on ``output``'s device.

    Returns:
        Scalar loss averaged over samples, differentiable with respect to ``output``.
    """
    if output.dim() < 2:
        raise ValueError(
            f"fisher='sampled' needs a model output of shape "
            f"(batch, {'classes' if predictive == 'categorical' else 'd'}),"
            f" got shape {tuple(output.shape)}"
        )
    check_classes(output, predictive)
    rows = output.reshape(-1, output.shape[-1])
    with torch.no_grad():
        if predictive == "categorical":
            probs = torch.softmax(rows.detach().float(), dim=-1)
            # Non-finite logits must not raise inside the forward pass; the step is skipped later anyway.
            finite = torch.isfinite(probs).all(dim=-1, keepdim=True)
            probs = torch.where(finite, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))
            targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            noise = torch.randn(rows.shape, generator=generator, device=rows.device, dtype=rows.dtype)
            targets = rows.detach() + noise
    if predictive == "categorical":
        return F.cross_entropy(rows, targets)
    return 0.5 * (rows - targets).pow(2).sum(dim=-1).mean()
