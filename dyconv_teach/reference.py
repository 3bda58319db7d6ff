"""Slow, obviously correct dynamic convolutions, and the mistakes people make.

The tests compare the core (:mod:`dyconv_teach.functional`) against the first two,
which work for 1, 2 and 3 spatial dimensions (the bank's shape tells); the book runs
the last two, 2-D, to show their real failures. All take the arguments of
:func:`~dyconv_teach.functional.dynamic_conv2d`.
"""

from __future__ import annotations

# F.conv2d's type stubs split int and str padding into two overloads, so passing on a
# padding typed as either needs the `type: ignore[arg-type]` comments below.
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import Unpack

from ._utils import ConvOptions, IntOrTuple, Padding
from .strategies import CONV

__all__ = ["per_sample_conv", "kernel_sum_conv", "naive_conv2d", "blog_dynamic_conv2d"]


def per_sample_conv(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
) -> Tensor:
    """Loop over the batch: build sample b's kernel, run one ordinary ``F.conv1d/2d/3d``."""
    conv_nd = CONV[weight.dim() - 3]
    outs = []
    for b in range(x.shape[0]):
        w_b = torch.einsum("j,j...->...", attention[b], weight)  # sum_j pi[b, j] Theta_j
        b_b = None if bias is None else attention[b] @ bias
        outs.append(conv_nd(x[b : b + 1], w_b, b_b, **conv))
    return torch.cat(outs)


def kernel_sum_conv(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
) -> Tensor:
    """Run K static convolutions and mix their outputs: by linearity of
    convolution, ``sum_j pi_j (Theta_j * x) = (sum_j pi_j Theta_j) * x``."""
    conv_nd = CONV[weight.dim() - 3]
    spatial = (1,) * (weight.dim() - 3)
    branches = [
        attention[:, j].reshape(-1, 1, *spatial) * conv_nd(x, weight[j], None if bias is None else bias[j], **conv)
        for j in range(weight.shape[0])
    ]
    return torch.stack(branches).sum(dim=0)


def naive_conv2d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
) -> Tensor:
    """The first thing everyone tries: aggregate to ``[B, O, C/g, kH, kW]`` and
    hand that 5-D weight to ``F.conv2d``. Torch rejects it; the book shows how."""
    K = weight.shape[0]
    aggregate = torch.mm(attention, weight.reshape(K, -1)).reshape(x.shape[0], *weight.shape[1:])
    aggregate_bias = None if bias is None else torch.mm(attention, bias)
    return F.conv2d(x, aggregate, aggregate_bias, **conv)  # type: ignore[arg-type]


def blog_dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
) -> Tensor:
    """The forward pass of a Chinese-language blog post's dynamic convolution (the post whose
    first heading is 普通卷积和动态卷积的区别; the book's chapter 5), line for line.

    Its mixed weight is reshaped with ``.view(out_planes, -1, k, k)``. For
    B = 1 that is ``[O, C/g, k, k]`` and correct; for B > 1 the B kernels
    land in the *input*-channel axis, ``[O, B*C/g, k, k]``, instead of the
    output-channel axis ``[B*O, C/g, k, k]``, and ``F.conv2d`` fails.
    (The correct line is ``.view(-1, in_planes // groups, k, k)``.)
    """
    K, out_planes = weight.shape[:2]
    kernel_size = weight.shape[-1]
    batch_size, in_planes, height, width = x.size()
    x = x.view(1, -1, height, width)
    weight = weight.view(K, -1)
    aggregate_weight = torch.mm(attention, weight).view(out_planes, -1, kernel_size, kernel_size)
    if bias is not None:
        aggregate_bias = torch.mm(attention, bias).view(-1)
        output = F.conv2d(x, weight=aggregate_weight, bias=aggregate_bias, stride=stride, padding=padding,
                          dilation=dilation, groups=groups * batch_size)
    else:
        output = F.conv2d(x, weight=aggregate_weight, bias=None, stride=stride, padding=padding,
                          dilation=dilation, groups=groups * batch_size)
    output = output.view(batch_size, out_planes, output.size(-2), output.size(-1))
    return output
