"""Argument types and validators shared by the core, the layers and the benchmark.

Private, like ``torch.nn.modules.utils``: the public API checks its arguments
with these, so every error names the bad value and what was expected before
torch gets to raise its own. Everything here works for 1, 2 and 3 spatial
dimensions (``dims``), as torch's ``_ConvNd`` does.
"""

from __future__ import annotations

import operator
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, TypedDict, Union

import torch
from torch import Tensor
from typing_extensions import Unpack

IntOrTuple = Union[int, Tuple[int, ...]]
Padding = Union[str, int, Tuple[int, ...]]

#: The names of the spatial axes of an input with 1, 2 or 3 spatial dimensions, as the
#: docstrings of ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` name them.
SPATIAL: Dict[int, Tuple[str, ...]] = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


class TensorMismatchError(ValueError, RuntimeError):
    """A tensor whose shape or device does not fit the convolution. A ``ValueError``, and a
    ``RuntimeError`` too, which is what ``nn.Conv2d`` raises for the same mistakes."""


class DtypeMismatchError(TypeError, RuntimeError):
    """A tensor whose dtype (or device) does not fit the others. A ``TypeError``, and a
    ``RuntimeError`` too, which is what ``nn.Conv2d`` raises for the same mistakes."""


class ConvOptions(TypedDict, total=False):
    """The keyword arguments that every dynamic convolution shares with ``F.conv1d/2d/3d``."""

    stride: IntOrTuple
    padding: Padding
    dilation: IntOrTuple
    groups: int


class DynamicConvFn(Protocol):
    """A function computing dynamic convolution with the arguments of
    :func:`dyconv_teach.functional.dynamic_conv2d` (the core, the references, the
    benchmark's baselines and peers)."""

    def __call__(
        self, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
    ) -> Tensor: ...


def input_text(dims: int, batched: bool = True) -> str:
    """``"[B, C, H, W]"`` for ``dims = 2`` (``"[C, H, W]"`` unbatched)."""
    return "[" + ", ".join((("B",) if batched else ()) + ("C",) + SPATIAL[dims]) + "]"


def bank_text(dims: int) -> str:
    """``"[K, O, C/groups, kH, kW]"`` for ``dims = 2``: the shape of a kernel bank."""
    return "[" + ", ".join(("K", "O", "C/groups") + tuple("k" + s for s in SPATIAL[dims])) + "]"


def balanced_orders(n: int) -> List[List[int]]:
    """Orders of ``n`` entries in which every entry runs right after every other one equally
    often: a Williams design, ``n`` orders for even ``n`` and ``2n`` for odd ``n``."""
    first = [0]
    low, high = 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    orders = [[(v + r) % n for v in first] for r in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


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


_N_INTS = {1: "a tuple of one int", 2: "a pair of ints", 3: "a triple of ints"}


def ntuple(name: str, value: object, dims: int, minimum: int) -> Tuple[int, ...]:
    """An int-or-tuple argument as a tuple of ``dims`` ints, each >= ``minimum``
    (``torch.nn.modules.utils._ntuple``, with errors that name the value)."""
    if type(value) is tuple and len(value) == dims and all(type(v) is int and v >= minimum for v in value):
        return value  # already normalised (what the layers pass on every forward)
    items = list(value) if isinstance(value, (tuple, list)) else [value] * dims
    try:
        if len(items) != dims:
            raise ValueError
        result = tuple(as_int(name, item) for item in items)
    except ValueError:
        raise ValueError(f"{name} must be an int or {_N_INTS[dims]}, got {value!r}") from None
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return result


def check_conv_args(
    dims: int,
    in_channels: int,
    out_channels: int,
    groups: object,
    stride: object,
    padding: object,
    dilation: object,
) -> Tuple[Tuple[int, ...], Union[str, Tuple[int, ...]], Tuple[int, ...]]:
    """Validate the hyper-parameters shared by the functional core and the layers.

    Returns ``(stride, padding, dilation)`` normalised to tuples of ``dims`` ints
    (``padding`` may stay the string ``'same'`` or ``'valid'``).
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
    stride_ = ntuple("stride", stride, dims, 1)
    dilation_ = ntuple("dilation", dilation, dims, 1)
    padding_: Union[str, Tuple[int, ...]]
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid', an int or {_N_INTS[dims]}, got {padding!r}")
        if padding == "same" and stride_ != (1,) * dims:
            raise ValueError(f"padding='same' needs stride=1 (as in F.conv{dims}d), got stride={stride!r}")
        padding_ = padding
    else:
        padding_ = ntuple("padding", padding, dims, 0)
    return stride_, padding_, dilation_


def explicit_padding(
    padding: Union[str, Tuple[int, ...]], kernel_size: Sequence[int], dilation: Sequence[int]
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """``(before, after)``: the zero padding of each spatial axis that ``padding`` means,
    ``'same'`` split as ``F.conv2d`` splits it (the odd pixel of an even total goes after)."""
    if padding == "valid":
        return (0,) * len(kernel_size), (0,) * len(kernel_size)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        return tuple(t // 2 for t in totals), tuple(t - t // 2 for t in totals)
    return tuple(padding), tuple(padding)  # type: ignore[arg-type]


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int) -> int:
    """One output dimension of a convolution, the formula of the ``nn.Conv2d`` docstring:
    ``floor((size + 2*padding - dilation*(kernel_size - 1) - 1) / stride + 1)``."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def output_shape(
    spatial: Sequence[int], weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tuple[int, ...]:
    """The spatial output size, e.g. ``(H', W')``, of an input of spatial size ``spatial``
    (e.g. ``(H, W)``) convolved with a bank ``[K, O, C/g, *kernel]`` (symbolic sizes stay
    symbolic: nothing is checked)."""
    return tuple(
        output_size(size, k, s, p, d) for size, k, s, p, d in zip(spatial, weight.shape[3:], stride, padding, dilation)
    )


def check_output_shape(
    spatial: Sequence[int], weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]
) -> Tuple[int, ...]:
    """:func:`output_shape`, with a clear error where the kernel does not fit the padded input."""
    shape = output_shape(spatial, weight, stride, padding, dilation)
    if min(shape) < 1:
        names = ", ".join(s + "'" for s in SPATIAL[len(shape)])
        raise TensorMismatchError(
            f"output size ({names}) = {shape} < 1: the kernel {tuple(weight.shape[3:])} with "
            f"dilation={tuple(dilation)} does not fit the input {tuple(spatial)} padded by {tuple(padding)}"
        )
    return shape


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on ``device_type``, or ``None`` outside autocast
    (and on device types without autocast, such as ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def check_tensors(x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], groups: int) -> None:
    """Check the shapes, dtypes and devices of the tensors of a batched dynamic convolution:
    ``x [B, C, *spatial]``, ``weight [K, O, C/groups, *kernel]``, ``attention [B, K]``, ``bias [K, O]``."""
    dims = x.dim() - 2
    if weight.dim() != dims + 3:
        raise TensorMismatchError(
            f"weight must be {dims + 3}-D {bank_text(dims)}, got {weight.dim()}-D of shape {tuple(weight.shape)}"
        )
    B, C = x.shape[:2]
    K, O, c_per_group = weight.shape[:3]
    if K < 1:
        raise TensorMismatchError(f"weight holds K={K} kernels; need K >= 1")
    if C != c_per_group * groups:
        raise TensorMismatchError(
            f"x has C={C} channels but weight {tuple(weight.shape)} with groups={groups} "
            f"expects C = {c_per_group} * {groups} = {c_per_group * groups}"
        )
    if attention.shape != (B, K):
        raise TensorMismatchError(f"attention must have shape [B, K] = [{B}, {K}], got {tuple(attention.shape)}")
    if bias is not None and bias.shape != (K, O):
        raise TensorMismatchError(f"bias must have shape [K, O] = [{K}, {O}], got {tuple(bias.shape)}")
    tensors = {"x": x, "weight": weight, "attention": attention}
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise DtypeMismatchError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
        if t.dtype != x.dtype:
            raise DtypeMismatchError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        if t.device != x.device:
            raise TensorMismatchError(f"{name} is on device {t.device} but x is on {x.device}; they must match")


_CHANNELS_LAST = {4: (torch.channels_last, (1, 3, 2, 0)), 5: (torch.channels_last_3d, (1, 4, 3, 2, 0))}


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format a convolution gives its output for input ``x``: torch's own rule
    (ATen's ``suggest_memory_format``), which reads the strides. A ``[B, 1, H, W]`` tensor is
    contiguous both ways; its strides tell which way it was made."""
    fmt, order = _CHANNELS_LAST.get(x.dim(), (torch.contiguous_format, ()))
    if not order or (x.is_contiguous() and not x.is_contiguous(memory_format=fmt)):
        return torch.contiguous_format  # the common case, without reading the strides in Python
    sizes, strides = x.shape, x.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in order:  # the axes from fastest to slowest in a channels_last layout
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * max(sizes[d], 1)
    return fmt
