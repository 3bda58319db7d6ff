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

__all__ = ["dynamic_conv2d", "check_conv_args", "output_size"]

IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Tuple[int, int]]


def _pair_arg(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """Normalise an int-or-pair argument and check every entry is >= ``minimum``."""
    # Anything but an int, tuple or list (a float, a string) becomes () and fails the length check.
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_positive_int(name: str, value: int) -> None:
    """Check ``value`` is an int >= 1 (a bool is not accepted)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
    _check_positive_int("groups", groups)
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
    """Check the shapes, dtypes and devices of the tensors :func:`dynamic_conv2d` gets."""
    _check_positive_int("groups", groups)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(
            f"weight must be 5-D [K, O, C/groups, kH, kW], got {weight.dim()}-D of shape {tuple(weight.shape)}"
        )
    B, C = x.shape[:2]
    K, O, c_per_group = weight.shape[:3]
    if B < 1:
        raise ValueError(f"x must hold at least one sample (B >= 1), got shape {tuple(x.shape)}")
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


# The K-branch sum's rule (see the comment in dynamic_conv2d): mixed weights over
# this many bytes, and (K - 1) * H' * W' at most this.
_BIG_MIXED_WEIGHT_BYTES = 32 * 2**20
_KERNEL_BRANCHES_MAX_WORK = 256


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """One output dimension of a convolution, the formula of the ``nn.Conv2d`` docstring:
    ``floor((size + 2*padding - dilation*(kernel_size - 1) - 1) / stride + 1)``."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _output_hw(
    x: Tensor, weight: Tensor, stride: Tuple[int, int], padding: Union[str, Tuple[int, int]], dilation: Tuple[int, int]
) -> Tuple[int, int]:
    """``(H', W')``; a ``ValueError`` if the dilated kernel does not fit the padded input."""
    if padding == "same":
        return x.shape[-2], x.shape[-1]
    pad = (0, 0) if isinstance(padding, str) else padding  # 'valid' (and 'same' returned above)
    hw = tuple(output_size(x.shape[2 + i], weight.shape[3 + i], stride[i], pad[i], dilation[i]) for i in range(2))
    if min(hw) < 1:
        raise ValueError(
            f"output size (H', W') = {hw} < 1: the kernel {tuple(weight.shape[3:])} with dilation={dilation} "
            f"does not fit the input {tuple(x.shape[2:])} padded by {pad}"
        )
    return hw  # type: ignore[return-value]


def _batch_as_groups(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, int],
    padding: Union[str, Tuple[int, int]],
    dilation: Tuple[int, int],
    groups: int,
) -> Tensor:
    """Batch-as-groups: every sample's mixed kernel, the batch run as one grouped ``F.conv2d``.

    Takes :func:`dynamic_conv2d`'s arguments, already checked and normalised.
    """
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
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=B * groups,
    )
    return out.reshape(B, O, out.shape[-2], out.shape[-1])


def _kernel_branches(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, int],
    padding: Union[str, Tuple[int, int]],
    dilation: Tuple[int, int],
    groups: int,
) -> Tensor:
    """K-branch sum: all K kernels in one static ``F.conv2d``, outputs mixed per sample.

    ``sum_k pi[b, k] * conv(x[b], W_k)`` equals ``conv(x[b], sum_k pi[b, k] * W_k)``
    by linearity. Takes :func:`dynamic_conv2d`'s arguments, already checked and normalised.
    """
    B = x.shape[0]
    K, O = weight.shape[:2]
    # A grouped conv hands group j the j-th contiguous block of output channels, so
    # lay the bank out [g, K, O/g]: group j's block holds its O/g channels of all K kernels.
    bank = weight.reshape(K, groups, O // groups, *weight.shape[2:]).transpose(0, 1)
    out = F.conv2d(x, bank.reshape(K * O, *weight.shape[2:]), None, stride, padding, dilation, groups)
    out = out.reshape(B, groups, K, O // groups, out.shape[-2], out.shape[-1])
    out = torch.einsum("bgkohw,bk->bgohw", out, attention).reshape(B, O, out.shape[-2], out.shape[-1])
    if bias is not None:
        out = out + torch.mm(attention, bias)[:, :, None, None]
    return out


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

    Two exact strategies (the per-sample loop's result to rounding, differentiable
    in ``x``, ``weight``, ``attention`` and ``bias``):

    - batch-as-groups (the default): mix the kernels per sample and run the whole
      batch as one grouped ``F.conv2d`` (for ``B = 1`` a plain convolution with the
      mixed kernel);
    - K-branch sum, when the mixed weights ``[B*O, C/g, kH, kW]`` exceed 32 MiB and
      ``(K - 1) * H' * W' <= 256``: one static convolution with all ``K*O`` kernels,
      then ``sum_k attention[b, k] * out_k[b]`` (linearity of convolution). It does
      K times the multiply-adds but never builds per-sample weights; see the comment
      in the body for the measurements behind the rule.

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
    B, K = x.shape[0], weight.shape[0]
    # Measured with `python -m dyconv_teach.bench` (torch 2.13 CPU, 2 threads,
    # forward+backward / static conv, K=4, 3x3, C=O in 32..256, B in {1, 32}).
    # Batch-as-groups was best in every cell but one: C=256 7x7 B=32, 6.7-6.9x
    # against 3.8-4.2x for the K-branch sum (four quiet runs). There the mixed weights take
    # 72 MiB, past the 32 MiB L3 cache and glibc's largest mmap threshold, so every
    # call maps them (and their gradient) afresh and page-faults them in, and each
    # of their elements feeds only H'*W' = 49 multiply-adds. The K-branch sum's extra
    # cost is (K - 1) static convs whatever the batch; past 32 MiB, batch-as-groups'
    # extra cost was ~2 ms per MiB of mixed weight, about 280 / (H' * W') static
    # convs at this conv speed, so the two cross near (K - 1) * H' * W' = 280. In
    # every cell under 32 MiB batch-as-groups won (C=128 14x14 B=32, 18 MiB: 1.5x
    # against 3.9-4.0x). Unfold+bmm, the per-sample loop and batch slices of 2-16
    # samples were never clearly ahead, so they are not kept.
    out_h, out_w = _output_hw(x, weight, stride_, padding_, dilation_)
    big = B * weight[0].numel() * x.element_size() > _BIG_MIXED_WEIGHT_BYTES
    if big and (K - 1) * out_h * out_w <= _KERNEL_BRANCHES_MAX_WORK:
        return _kernel_branches(x, weight, attention, bias, stride_, padding_, dilation_, groups)
    return _batch_as_groups(x, weight, attention, bias, stride_, padding_, dilation_, groups)
