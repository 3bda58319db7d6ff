"""Shape bookkeeping for the book: every shape here comes from a real torch call.

The explorers of chapters 2, 3 and 5 (:mod:`dyconv_teach.teaching.widgets`) only render what these
plain functions return, so the tests and the notebooks can call them directly:

- :func:`static_conv_shapes`: one ``F.conv2d`` call, and the output-size formula.
- :func:`grouped_conv_shapes`: a grouped convolution and its parameter count.
- :func:`batch_kernel_shapes`: the mixing of the K kernels, the naive 5-D weight,
  the blog post's ``.view`` and the batch-as-groups trick, each shape recorded
  from the torch call it makes.

Every torch error is caught and returned as its real message, never retyped.
:data:`EXAMPLE` is the book's running example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .._utils import output_size
from ..functional import dynamic_conv2d
from ..reference import blog_dynamic_conv2d, naive_conv2d, per_sample_conv

__all__ = [
    "Shape",
    "Example",
    "EXAMPLE",
    "shape_text",
    "ConvCall",
    "record_conv_calls",
    "conv2d_output_size",
    "output_size_formula",
    "StaticConvShapes",
    "static_conv_shapes",
    "GroupedConvShapes",
    "grouped_conv_shapes",
    "BatchKernelShapes",
    "batch_kernel_shapes",
]

#: A tensor's shape as a tuple of ints.
Shape = Tuple[int, ...]


class Example(NamedTuple):
    """Sizes of a running example, in the book's notation."""

    B: int  # samples in the batch
    C: int  # input channels
    O: int  # output channels
    K: int  # kernels in the bank, indexed by j
    k: int  # kernel size, k x k
    H: int  # input height (and width W = H)


#: The book's running example. No two of B, C, O, K, k and H' = H - k + 1 = 7 are
#: equal, so each number in a shape tells which axis it is; g is 1 or 2.
EXAMPLE = Example(B=2, C=4, O=6, K=5, k=3, H=9)

def shape_text(shape: Optional[Shape]) -> str:
    """``"[2, 6, 4, 3, 3]"``, or ``"-"`` for no shape."""
    return "-" if shape is None else "[" + ", ".join(str(n) for n in shape) + "]"


#: The formula of the ``torch.nn.Conv2d`` docstring, in the book's notation.
OUTPUT_SIZE_FORMULA = "H' = floor((H + 2*padding - dilation*(k - 1) - 1) / stride + 1)"


def conv2d_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output height (or width) of a convolution, as in the ``nn.Conv2d`` docstring.

    ``floor((size + 2*padding - dilation*(kernel_size - 1) - 1) / stride + 1)``

    Raises:
        ValueError: if an argument is out of range, or the output would be
            smaller than 1 (the dilated kernel is larger than the padded input).
    """
    for name, value, minimum in (
        ("size", size, 1),
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
        ("dilation", dilation, 1),
    ):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    out = output_size(size, kernel_size, stride, padding, dilation)
    if out < 1:
        raise ValueError(
            f"output size would be {out} < 1: the dilated kernel spans dilation*(kernel_size-1)+1 = "
            f"{dilation * (kernel_size - 1) + 1} pixels but the padded input has only "
            f"size+2*padding = {size + 2 * padding}"
        )
    return out


def output_size_formula(size: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> str:
    """The output-size formula with the numbers filled in, e.g.
    ``"H' = floor((8 + 2*1 - 1*(3 - 1) - 1) / 1 + 1) = 8"``."""
    out = output_size(size, kernel_size, stride, padding, dilation)
    text = (
        f"H' = floor(({size} + 2*{padding} - {dilation}*({kernel_size} - 1) - 1) / {stride} + 1) = {out}"
    )
    return text if out >= 1 else f"{text}  (< 1: no valid output)"


@dataclass(frozen=True)
class ConvCall:
    """The arguments and result of one ``F.conv1d``, ``F.conv2d`` or ``F.conv3d`` call, as shapes."""

    input: Shape
    weight: Shape
    groups: int
    output: Optional[Shape] = None  # None when the call raised


_CONVS = (F.conv1d, F.conv2d, F.conv3d)


class record_conv_calls(TorchFunctionMode):
    """Context manager that records every ``F.conv1d``, ``F.conv2d`` and ``F.conv3d`` call made
    inside it.

    ``with record_conv_calls() as calls: f(...)`` leaves one :class:`ConvCall` per call in
    ``calls.calls``, also for a call that raised, so a shape is read off the real call instead
    of recomputed by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[ConvCall] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Tuple[Any, ...] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _CONVS:
            return func(*args, **kwargs)
        x, weight = args[0], kwargs["weight"] if "weight" in kwargs else args[1]
        groups = kwargs.get("groups", args[6] if len(args) > 6 else 1)
        call = ConvCall(tuple(x.shape), tuple(weight.shape), int(groups))
        self.calls.append(call)
        out = func(*args, **kwargs)
        self.calls[-1] = ConvCall(call.input, call.weight, call.groups, tuple(out.shape))
        return out


@dataclass(frozen=True)
class StaticConvShapes:
    """One ordinary convolution: ``x [B, C, H, W] * weight [O, C, k, k]``."""

    input: Shape
    weight: Shape
    output: Optional[Shape]  # None when torch raised
    error: Optional[str]  # torch's message, e.g. for an output smaller than 1
    formula: str  # the output-size formula with the numbers filled in


def static_conv_shapes(
    C: int, O: int, k: int, stride: int = 1, padding: int = 0, dilation: int = 1, H: int = 8, B: int = 1
) -> StaticConvShapes:
    """Run ``F.conv2d`` on a square ``[B, C, H, H]`` input and report every shape."""
    x = torch.zeros(B, C, H, H)
    weight = torch.zeros(O, C, k, k)
    output: Optional[Shape] = None
    error: Optional[str] = None
    try:
        output = tuple(F.conv2d(x, weight, stride=stride, padding=padding, dilation=dilation).shape)
    except RuntimeError as exc:
        error = str(exc)
    formula = output_size_formula(H, k, stride, padding, dilation)
    return StaticConvShapes(tuple(x.shape), tuple(weight.shape), output, error, formula)


@dataclass(frozen=True)
class GroupedConvShapes:
    """A grouped convolution with ``g`` groups, and what grouping saves."""

    input: Shape
    weight: Optional[Shape]  # [O, C/g, k, k]; None when g does not divide C and O
    output: Optional[Shape]
    error: Optional[str]  # nn.Conv2d's message when g does not divide C or O
    #: For each group, its input and its output channels as two ``range`` objects (empty on error).
    split: Tuple[Tuple[range, range], ...] = field(default=())
    params: int = 0  # weight entries of this layer, O * C/g * k * k
    params_dense: int = 0  # the same layer with g = 1, O * C * k * k


def grouped_conv_shapes(
    C: int, O: int, g: int, k: int = EXAMPLE.k, H: int = EXAMPLE.H, B: int = 1
) -> GroupedConvShapes:
    """Build ``nn.Conv2d(C, O, k, groups=g)`` and run ``F.conv2d(x, its weight, groups=g)``.

    When ``g`` does not divide ``C`` and ``O`` there is no weight ``[O, C/g, k, k]``:
    the result holds the ``ValueError`` that ``nn.Conv2d`` raises.
    """
    x = torch.zeros(B, C, H, H)
    try:
        weight = nn.Conv2d(C, O, k, groups=g, bias=False).weight.detach()
    except ValueError as exc:
        return GroupedConvShapes(tuple(x.shape), None, None, str(exc))
    output = tuple(F.conv2d(x, weight, groups=g).shape)
    c, o = C // g, O // g
    split = tuple((range(i * c, (i + 1) * c), range(i * o, (i + 1) * o)) for i in range(g))
    return GroupedConvShapes(tuple(x.shape), tuple(weight.shape), output, None, split, weight.numel(), O * C * k * k)


@dataclass(frozen=True)
class BatchKernelShapes:
    """Dynamic convolution of a batch: the kernel mix, the naive path, the blog's, the trick's."""

    x: Shape  # [B, C, H, W]
    attention: Shape  # pi, [B, K]
    bank: Shape  # Theta, [K, O, C/g, k, k]
    flat_bank: Shape  # Theta.reshape(K, -1), [K, O*C/g*k*k]
    mixed: Shape  # pi @ flat_bank, [B, O*C/g*k*k]: K is summed away
    aggregated: Shape  # one kernel per sample, [B, O, C/g, k, k]
    naive_error: str  # what F.conv2d says to the 5-D weight
    blog_call: ConvCall  # the blog code's F.conv2d call: its .view'ed weight and groups
    blog_error: Optional[str]  # None when the blog code works (B = 1)
    blog_output: Optional[Shape]  # the blog code's final .view, when it works
    trick_call: ConvCall  # x [1, B*C, H, W], weight [B*O, C/g, k, k], groups=B*g
    trick_output: Shape  # [B, O, H', W']
    matches_loop: bool  # the trick equals the per-sample loop (torch.allclose)


def batch_kernel_shapes(
    B: int = EXAMPLE.B,
    K: int = EXAMPLE.K,
    C: int = EXAMPLE.C,
    O: int = EXAMPLE.O,
    g: int = 1,
    k: int = EXAMPLE.k,
    H: int = EXAMPLE.H,
    seed: int = 0,
) -> BatchKernelShapes:
    """Push one random batch through the three ways of batching dynamic convolution.

    The bank ``Theta`` holds the K kernels ``Theta_j``; sample ``b``'s kernel is
    ``sum_j pi[b, j] * Theta_j``. The attention ``pi`` is a softmax over random
    logits; the tensors come from a generator seeded with ``seed``, so the result
    is the same on every run.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=gen)
    bank = torch.randn(K, O, C // g, k, k, generator=gen)
    pi = torch.softmax(torch.randn(B, K, generator=gen), dim=1)
    # The step where K lives and disappears: [B, K] @ [K, O*C/g*k*k] -> [B, O*C/g*k*k].
    flat_bank = bank.reshape(K, -1)
    mixed = pi @ flat_bank

    with record_conv_calls() as naive:
        try:
            naive_conv2d(x, bank, pi, groups=g)
        except RuntimeError as exc:
            naive_error = str(exc)
        else:  # pragma: no cover - torch has always rejected a 5-D weight in conv2d
            raise AssertionError("F.conv2d accepted a 5-D weight")

    blog_error: Optional[str] = None
    blog_output: Optional[Shape] = None
    with record_conv_calls() as blog:
        try:
            blog_output = tuple(blog_dynamic_conv2d(x, bank, pi, groups=g).shape)
        except RuntimeError as exc:
            blog_error = str(exc)

    with record_conv_calls() as trick:
        out = dynamic_conv2d(x, bank, pi, groups=g, strategy="batch_as_groups")
    loop: Tensor = per_sample_conv(x, bank, pi, groups=g)

    return BatchKernelShapes(
        x=tuple(x.shape),
        attention=tuple(pi.shape),
        bank=tuple(bank.shape),
        flat_bank=tuple(flat_bank.shape),
        mixed=tuple(mixed.shape),
        aggregated=naive.calls[0].weight,
        naive_error=naive_error,
        blog_call=blog.calls[0],
        blog_error=blog_error,
        blog_output=blog_output,
        trick_call=trick.calls[0],
        trick_output=tuple(out.shape),
        matches_loop=bool(torch.allclose(out, loop, rtol=1e-4, atol=1e-5)),
    )
