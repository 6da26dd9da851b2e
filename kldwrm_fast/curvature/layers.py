"""Rows of the Kronecker factors for the supported layers (docs/algorithms.md §1).

Conventions (see Note [Conv2d normalisation]):

* ``nn.Linear``: inputs with extra leading dimensions are flattened into rows and every row counts as one
  sample, so ``A = āᵀā/rows`` and ``Γ = rows · eᵀe``.
* ``nn.Conv2d`` (groups=1): rows of ``ā`` are the im2col patches of every sample and location, with the
  layer's own padding mode, stride and dilation; rows of ``e`` are the per-location output gradients.

Note [Conv2d normalisation]
    With T locations and batch m we use ``A = āᵀā/(m·T)`` (the mean over all patches) and
    ``Γ = m · Σ_{i,t} e_{i,t} e_{i,t}ᵀ`` (per-sample gradients summed over locations, averaged over the
    batch). The product ``A ⊗ Γ`` equals KFC's ``Ω ⊗ Γ`` (Grosse & Martens, 2016) and for T = 1 both
    reduce exactly to the Linear convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` becomes a Kronecker block: ``nn.Linear`` or ``nn.Conv2d`` with ``groups=1``."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _batched_image(module: nn.Module, x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


VIEW_COPY_MIN_WIDTH = 5
"""Kernel widths from which a convolution's patches are copied from a strided view of the input: that copy's
innermost run is one kernel row, so narrower kernels do better with ``F.unfold``'s im2col and a transposing copy
(two passes). Measured on the 2-core CPU over C ∈ {1…128}, k ∈ {3, 5}, H ∈ {8, 16, 32}: the view copy took
0.22–1.01× the time for k = 5 and 0.5–2.4× for k = 3."""


def _patches(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, int]:
    """``(patches, n)``: the im2col patches of a batched, padded image ``x`` with ``n = C·kh·kw`` columns, either
    as (B, L, n) from ``F.unfold`` or, without a copy, as the strided view (B, OH, OW, C, kh, kw) of ``x``."""
    (kh, kw), (sh, sw) = module.kernel_size, module.stride
    n = x.shape[1] * kh * kw
    if kw >= VIEW_COPY_MIN_WIDTH and module.dilation == (1, 1):
        return x.unfold(2, kh, sh).unfold(3, kw, sw).permute(0, 2, 3, 1, 4, 5), n
    patches = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
    return patches.transpose(1, 2), n


def input_rows(module: nn.Module, x: Tensor, with_bias: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Augmented input rows ``ā`` (rows, n_in[+1]) of a layer input ``x``, in ``dtype`` (default ``x``'s).

    Written with at most one copy: the patches (or inputs) and the bias column of ones go straight into the
    result, in its dtype.
    """
    if isinstance(module, nn.Conv2d):
        x = _batched_image(module, x)
        pad = module._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        source, n = _patches(module, x)
    else:
        source, n = x.reshape(-1, x.shape[-1]), x.shape[-1]
    dtype = dtype or x.dtype
    if not with_bias:
        return source.reshape(-1, n).to(dtype)
    count = source.numel() // n
    rows = torch.empty(count, n + 1, dtype=dtype, device=x.device)
    rows[:, :n].view(source.shape).copy_(source)
    rows[:, n].fill_(1.0)
    return rows


def output_rows(module: nn.Module, e: Tensor) -> Tensor:
    """Output-gradient rows (rows, n_out) of a gradient ``e`` with the layer output's shape."""
    if isinstance(module, nn.Conv2d):
        e = _batched_image(module, e)
        return e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
    return e.reshape(-1, e.shape[-1])


def sample_count(module: nn.Module, e: Tensor) -> int:
    """The number of samples ``m`` the loss averages over for one captured output gradient."""
    if isinstance(module, nn.Conv2d):
        return e.shape[0] if e.dim() == 4 else 1
    return e.numel() // e.shape[-1]


def weight_matrix(module: nn.Module, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor as the (n_out, n_in) matrix of the block form (a view)."""
    return tensor.reshape(tensor.shape[0], -1)
