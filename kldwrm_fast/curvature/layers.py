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

NORMALISATIONS = tuple(
    kind for kind in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    if kind is not None
)
"""The normalisation layers whose affine parameters form a scale-and-shift block (``RMSNorm`` where torch has it;
``_BatchNorm`` covers ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``)."""


FEATURE_LAST = tuple(kind for kind in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if kind is not None)
"""Normalisations over the last dimensions (their affine parameters have those dimensions' shape); the others
(GroupNorm, BatchNorm) normalise channels, dimension 1."""


def is_normalisation(module: nn.Module) -> bool:
    """Whether ``module`` is a normalisation layer with affine parameters (a scale-and-shift block)."""
    return isinstance(module, NORMALISATIONS) and getattr(module, "weight", None) is not None


def is_supported(module: nn.Module) -> bool:
    """Whether ``module`` becomes a block: ``nn.Linear``, ``nn.Conv2d`` with ``groups=1``, ``nn.Embedding``, or an
    affine normalisation layer."""
    return (
        isinstance(module, (nn.Linear, nn.Embedding))
        or (isinstance(module, nn.Conv2d) and module.groups == 1)
        or is_normalisation(module)
    )


def _batched_image(module: nn.Module, x: Tensor) -> Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def _patch_view(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col patches of a batched, padded image ``x`` (B, C, H, W) as a strided view (C, kh, kw, B, OH, OW),
    with the layer's stride and dilation: no copy."""
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    batch, channels, height, width = x.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    s_b, s_c, s_h, s_w = x.stride()
    return x.as_strided(
        (channels, kh, kw, batch, out_h, out_w), (s_c, s_h * dh, s_w * dw, s_b, s_h * sh, s_w * sw), x.storage_offset()
    )


def _with_ones(source: Tensor, features: int, with_bias: bool, dtype: torch.dtype, feature_major: bool) -> Tensor:
    """(rows, features[+1]) rows of ``source`` in ``dtype`` with a last column of ones when ``with_bias``, in one
    copy. ``source`` is a view whose first (``feature_major``) or last dimensions are the features; feature-major
    rows are the transpose of a contiguous (features[+1], rows) tensor."""
    count = source.numel() // features
    if feature_major:
        columns = torch.empty(features + int(with_bias), count, dtype=dtype, device=source.device)
        columns[:features].view(source.shape).copy_(source)
        if with_bias:
            columns[features].fill_(1.0)
        return columns.t()
    if not with_bias:
        return source.reshape(count, features).to(dtype)
    rows = torch.empty(count, features + 1, dtype=dtype, device=source.device)
    rows[:, :features].view(source.shape).copy_(source)
    rows[:, features].fill_(1.0)
    return rows


def input_rows(module: nn.Module, x: Tensor, with_bias: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Augmented input rows ``ā`` (rows, n_in[+1]) of a layer input ``x``, in ``dtype`` (default ``x``'s).

    Written with at most one copy: the patches (or inputs) and the bias column of ones go straight into the
    result, in its dtype. A convolution's patches are copied from a strided view of the padded input, into the
    layout whose innermost run is longer: feature-major (a run is one output row of the image) unless the output
    is narrower than the kernel, then row-major (a run is one kernel row). Measured on the 2-core CPU, for
    C ∈ {1…128}, H ∈ {8…224}, strides 1–2 and dilation 2: the copy took 0.16–0.72× the time of ``F.unfold`` and a
    transposing copy for 3-wide kernels, and 0.64–1.01× that of a row-major copy for 5- and 7-wide ones. ``xᵀx``
    from feature-major rows took 0.98–1.18× as long; copy and ``xᵀx`` together took 0.26–0.92× for 3-wide
    kernels and 0.82–1.03× for 5-wide ones (the largest where C ≥ 64 makes ``xᵀx`` dominate). Every
    consumer (``xᵀx`` in torch, Triton and CUDA) takes strides.
    """
    dtype = dtype or x.dtype
    if not isinstance(module, nn.Conv2d):
        return _with_ones(x.reshape(-1, x.shape[-1]), x.shape[-1], with_bias, dtype, feature_major=False)
    x = _batched_image(module, x)
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    patches = _patch_view(module, x)
    features = patches.shape[:3].numel()
    if patches.shape[-1] >= patches.shape[2]:
        return _with_ones(patches, features, with_bias, dtype, feature_major=True)
    return _with_ones(patches.permute(3, 4, 5, 0, 1, 2), features, with_bias, dtype, feature_major=False)


def output_rows(module: nn.Module, e: Tensor) -> Tensor:
    """Output-gradient rows (rows, n_out) of a gradient ``e`` with the layer output's shape; a convolution's come
    feature-major (the transpose of a contiguous (n_out, rows) tensor), for the reason :func:`input_rows` gives."""
    if isinstance(module, nn.Conv2d):
        e = _batched_image(module, e)
        return e.transpose(0, 1).reshape(e.shape[1], -1).t()
    return e.reshape(-1, e.shape[-1])


def sample_count(module: nn.Module, e: Tensor) -> int:
    """The number of samples ``m`` the loss averages over for one captured output gradient."""
    if isinstance(module, nn.Conv2d):
        return e.shape[0] if e.dim() == 4 else 1
    return e.numel() // e.shape[-1]


def weight_matrix(module: nn.Module, tensor: Tensor) -> Tensor:
    """A weight-shaped tensor as the (n_out, n_in) matrix of the block form (a view)."""
    return tensor.reshape(tensor.shape[0], -1)
