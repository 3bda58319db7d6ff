"""Argument types and validators shared by the core, the layer and the benchmark.

Private, like ``torch.nn.modules.utils``: the public API checks its arguments
with these, so every error names the bad value and what was expected before
torch gets to raise its own.
"""

from __future__ import annotations

import operator
from typing import Optional, Protocol, Sequence, Tuple, TypedDict, Union

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format
from typing_extensions import Unpack

IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Tuple[int, int]]


class Conv2dOptions(TypedDict, total=False):
    """The keyword arguments that every dynamic convolution shares with ``F.conv2d``."""

    stride: IntPair
    padding: Padding
    dilation: IntPair
    groups: int


class DynamicConv2dFn(Protocol):
    """A function computing dynamic convolution with the arguments of
    :func:`dyconv_teach.functional.dynamic_conv2d` (the core, the references, the
    benchmark's baselines)."""

    def __call__(
        self, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[Conv2dOptions]
    ) -> Tensor: ...


def as_int(name: str, value: object) -> int:
    """``value`` as an int if it is one (a Python or NumPy integer, anything with
    ``__index__``), else a ``ValueError`` naming it. A bool is not an int here."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an int, got {value!r}") from None


def positive_int(name: str, value: object) -> int:
    """``value`` as an int >= 1, or a ``ValueError`` naming it."""
    try:
        result = as_int(name, value)
    except ValueError:
        result = 0
    if result < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return result


def pair(name: str, value: object, minimum: int) -> Tuple[int, int]:
    """An int-or-pair argument as a pair of ints, each >= ``minimum``."""
    items = list(value) if isinstance(value, (tuple, list)) else [value, value]
    try:
        if len(items) != 2:
            raise ValueError
        result = (as_int(name, items[0]), as_int(name, items[1]))
    except ValueError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_conv_args(
    in_channels: int,
    out_channels: int,
    groups: object,
    stride: object,
    padding: object,
    dilation: object,
) -> Tuple[Tuple[int, int], Union[str, Tuple[int, int]], Tuple[int, int]]:
    """Validate the hyper-parameters shared by the functional core and the layer.

    Returns ``(stride, padding, dilation)`` normalised to pairs (``padding`` may
    stay the string ``'same'`` or ``'valid'``).
    """
    g = positive_int("groups", groups)
    if in_channels % g != 0:
        raise ValueError(
            f"groups={g} must divide in_channels={in_channels} (each group sees in_channels/groups channels)"
        )
    if out_channels % g != 0:
        raise ValueError(
            f"groups={g} must divide out_channels={out_channels} (each group produces out_channels/groups channels)"
        )
    stride_ = pair("stride", stride, 1)
    dilation_ = pair("dilation", dilation, 1)
    padding_: Union[str, Tuple[int, int]]
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
        if padding == "same" and stride_ != (1, 1):
            raise ValueError(f"padding='same' needs stride=1 (as in F.conv2d), got stride={stride!r}")
        padding_ = padding
    else:
        padding_ = pair("padding", padding, 0)
    return stride_, padding_, dilation_


def same_padding(kernel_size: Tuple[int, int], dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of ``padding='same'``, split as
    ``F.conv2d`` splits it: the odd pixel of an even total goes to the bottom/right."""
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return th // 2, th - th // 2, tw // 2, tw - tw // 2


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """One output dimension of a convolution, the formula of the ``nn.Conv2d`` docstring:
    ``floor((size + 2*padding - dilation*(kernel_size - 1) - 1) / stride + 1)``."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def output_hw(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tuple[int, int]:
    """``(H', W')`` of ``x`` ``[B, C, H, W]`` convolved with a bank ``[K, O, C/g, kH, kW]``
    (symbolic sizes stay symbolic: nothing is checked)."""
    return (
        output_size(x.shape[2], weight.shape[3], stride[0], padding[0], dilation[0]),
        output_size(x.shape[3], weight.shape[4], stride[1], padding[1], dilation[1]),
    )


def check_output_hw(
    x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tuple[int, int]:
    """:func:`output_hw`, with a clear error where the kernel does not fit the padded input."""
    hw = output_hw(x, weight, stride, padding, dilation)
    if min(hw) < 1:
        raise ValueError(
            f"output size (H', W') = {hw} < 1: the kernel {tuple(weight.shape[3:])} with dilation={tuple(dilation)} "
            f"does not fit the input {tuple(x.shape[2:])} padded by {tuple(padding)}"
        )
    return hw


# The device types torch.autocast knows. (torch.amp.is_autocast_available would say, but
# torch.compile cannot trace it on torch 2.11.)
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on ``device_type``, or ``None`` outside autocast
    (and on device types without autocast, such as ``meta``)."""
    if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_tensors(x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], groups: int) -> None:
    """Check the shapes, dtypes and devices of the tensors of a batched dynamic convolution:
    ``x [B, C, H, W]``, ``weight [K, O, C/groups, kH, kW]``, ``attention [B, K]``, ``bias [K, O]``."""
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


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``F.conv2d`` gives its output for input ``x``: torch's own rule,
    which reads the strides (a ``[B, 1, H, W]`` tensor is contiguous both ways, but its
    strides tell)."""
    return torch.channels_last if suggest_memory_format(x) == torch.channels_last else torch.contiguous_format
