"""Exact batched core of dynamic convolution.

Dynamic convolution (Chen et al., "Dynamic Convolution: Attention over
Convolution Kernels", CVPR 2020, arXiv:1912.03458) gives every sample ``b`` its
own kernel ``sum_k pi[b, k] * weight[k]``. ``F.conv2d`` takes one 4-D weight for
the whole batch, so this module folds the batch into the channel axis and lets
grouped convolution pair every sample with its own kernel.

Nothing here is teaching code: :mod:`dyconv_teach.reference` holds the slow,
obviously correct versions that the tests compare against.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dynamic_conv2d", "check_conv_args"]

IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Tuple[int, int]]


def _pair_arg(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """Normalise an int-or-pair argument and check every entry is >= ``minimum``."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def check_conv_args(
    in_channels: int,
    out_channels: int,
    groups: int,
    stride: IntPair,
    padding: Padding,
    dilation: IntPair,
) -> Tuple[Tuple[int, int], Union[str, Tuple[int, int]], Tuple[int, int]]:
    """Validate the hyper-parameters shared by the functional core and the layer.

    Returns ``(stride, padding, dilation)`` normalised to pairs (``padding`` may
    stay the string ``'same'`` or ``'valid'``). Every error names the bad value
    and what was expected, before torch gets to raise its own.
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if in_channels % groups != 0:
        raise ValueError(
            f"groups={groups} must divide in_channels={in_channels} "
            f"(each group sees in_channels/groups channels)"
        )
    if out_channels % groups != 0:
        raise ValueError(
            f"groups={groups} must divide out_channels={out_channels} "
            f"(each group produces out_channels/groups channels)"
        )
    stride_ = _pair_arg("stride", stride, 1)
    dilation_ = _pair_arg("dilation", dilation, 1)
    padding_: Union[str, Tuple[int, int]]
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if padding == "same" and stride_ != (1, 1):
            raise ValueError(f"padding='same' needs stride=1 (as in F.conv2d), got stride={stride!r}")
        padding_ = padding
    else:
        padding_ = _pair_arg("padding", padding, 0)
    return stride_, padding_, dilation_


def _check_tensors(x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], groups: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(
            f"weight must be 5-D [K, O, C/groups, kH, kW], got {weight.dim()}-D of shape {tuple(weight.shape)}"
        )
    B, C = x.shape[:2]
    K, O, c_per_group = weight.shape[:3]
    if K < 1:
        raise ValueError(f"weight holds K={K} kernels; need K >= 1")
    if C != c_per_group * groups:
        raise ValueError(
            f"x has C={C} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects C = {c_per_group} * {groups} = {c_per_group * groups}"
        )
    if O % groups != 0:
        raise ValueError(f"groups={groups} must divide out_channels O={O} of weight {tuple(weight.shape)}")
    if attention.shape != (B, K):
        raise ValueError(f"attention must have shape [B, K] = [{B}, {K}], got {tuple(attention.shape)}")
    if bias is not None and bias.shape != (K, O):
        raise ValueError(f"bias must have shape [K, O] = [{K}, {O}], got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "attention": attention}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on device {t.device} but x is on {x.device}; they must match")


def dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    r"""Convolve each sample with its own attention-weighted mixture of K kernels.

    For every sample ``b``::

        out[b] = conv2d(x[b], sum_k attention[b, k] * weight[k],
                        sum_k attention[b, k] * bias[k])

    computed for the whole batch in one grouped ``F.conv2d`` call.

    Args:
        x: input ``[B, C, H, W]`` (any memory format).
        weight: kernel bank ``[K, O, C/groups, kH, kW]``.
        attention: mixing weights ``pi``, ``[B, K]``.
        bias: bias bank ``[K, O]`` or ``None``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`
            (``padding`` may be ``'same'`` or ``'valid'``).

    Returns:
        ``[B, O, H', W']`` with
        ``H' = floor((H + 2*padding[0] - dilation[0]*(kH - 1) - 1) / stride[0] + 1)``.
    """
    _check_tensors(x, weight, attention, bias, groups)
    stride_, padding_, dilation_ = check_conv_args(x.shape[1], weight.shape[1], groups, stride, padding, dilation)
    B, C, H, W = x.shape
    K, O = weight.shape[:2]
    # Mix the K kernels per sample: [B, K] @ [K, O*C/g*kH*kW] -> one kernel set per
    # sample, stacked along the output-channel axis as [B*O, C/g, kH, kW].
    batch_weight = torch.mm(attention, weight.reshape(K, -1)).reshape(B * O, *weight.shape[2:])
    batch_bias = None if bias is None else torch.mm(attention, bias).reshape(B * O)
    # Move batch elements into channels so each sample is one group of C channels
    # and meets only its own kernels; reshape (not view) so channels_last works.
    out = F.conv2d(
        x.reshape(1, B * C, H, W),
        batch_weight,
        batch_bias,
        stride=stride_,
        padding=padding_,
        dilation=dilation_,
        groups=B * groups,
    )
    return out.reshape(B, O, out.shape[-2], out.shape[-1])
