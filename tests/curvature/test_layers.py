"""Patch extraction for Conv2d: the captured rows must reproduce the layer's own weight gradient."""

import pytest
import torch
from torch import nn

from kldwrm_fast.curvature import layers

CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 2), stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding=(2, 1)),
    dict(kernel_size=3, padding="same", padding_mode="reflect"),
    dict(kernel_size=2, stride=(1, 2), padding=1, padding_mode="circular", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="replicate"),
    dict(kernel_size=5),
    dict(kernel_size=(2, 5), stride=(2, 1), padding=(1, 2), padding_mode="reflect"),
    dict(kernel_size=5, stride=2, padding=2, bias=False),
    dict(kernel_size=5, dilation=(1, 2), padding=3),
]


@pytest.mark.parametrize("options", CONV_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("layout", ["batched", "unbatched", "channels_last", "channel_slice"])
def test_conv_rows_reproduce_the_weight_gradient(options, layout):
    conv = nn.Conv2d(2, 3, **options).double()
    batched = layout != "unbatched"
    x = torch.randn(*((4,) if batched else ()), 2, 7, 6, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if layout == "channel_slice":  # a view with a storage offset and a batch stride of five channels
        x = torch.randn(4, 5, 7, 6, dtype=torch.float64)[:, 2:4]
    out = conv(x)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    with_bias = conv.bias is not None
    a = layers.input_rows(conv, x, with_bias)
    e = layers.output_rows(conv, weights)  # d(sum(out * weights))/d(out) = weights
    grad = e.T @ a
    # the patches are copied feature-major unless the output is narrower than the kernel: both layouts are covered
    assert a.t().is_contiguous() == (out.shape[-1] >= conv.kernel_size[1])
    torch.testing.assert_close(grad[:, : a.shape[1] - with_bias], conv.weight.grad.reshape(3, -1))
    if with_bias:
        torch.testing.assert_close(grad[:, -1], conv.bias.grad)
    assert layers.sample_count(conv, weights) == (4 if batched else 1)


def test_groups_other_than_one_are_not_kronecker_blocks():
    assert layers.is_supported(nn.Conv2d(4, 4, 3))
    assert not layers.is_supported(nn.Conv2d(4, 4, 3, groups=2))
    assert layers.is_supported(nn.Linear(2, 2))
    assert not layers.is_supported(nn.Conv1d(2, 2, 3))
