"""Exact batched core of dynamic convolution: :func:`dynamic_conv1d`, :func:`dynamic_conv2d`
and :func:`dynamic_conv3d`, mirroring ``F.conv1d``, ``F.conv2d`` and ``F.conv3d``.

Dynamic convolution (Chen et al., "Dynamic Convolution: Attention over
Convolution Kernels", CVPR 2020, arXiv:1912.03458) gives every sample ``b`` its
own kernel ``sum_j pi[b, j] * Theta_j``. A convolution takes one weight for the
whole batch, so the batch has to be folded into something it does accept:
:mod:`dyconv_teach.strategies` holds the exact ways to do that. One implementation
serves 1, 2 and 3 spatial dimensions, as torch's ``_ConvNd`` does.

Graphs that must serve every batch size replace the choice by what they can hold.
``torch.compile`` runs batch-as-groups as one custom operator where the rule picks it.
``torch.jit.trace`` records batch-as-groups as a call of a TorchScript function, which computes
``groups = B*g`` when the graph runs. ``torch.export`` with a symbolic batch (in strict mode, with
any batch: its tracer cannot tell a symbolic size from an int), and the ONNX exporters (ONNX's
``Conv`` has a fixed ``group``), record the K-branch sum: standard operators with fixed
attributes, at K times the multiply-adds of the convolution.

Nothing here is teaching code: :mod:`dyconv_teach.reference` holds the slow,
obviously correct versions that the tests compare against.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import strategies
from ._utils import (
    SPATIAL,
    DtypeMismatchError,
    IntOrTuple,
    Padding,
    TensorMismatchError,
    autocast_dtype,
    bank_text,
    check_conv_args,
    check_output_shape,
    check_tensors,
    explicit_padding,
    input_text,
    positive_int,
)

__all__ = [
    "dynamic_conv1d", "dynamic_conv2d", "dynamic_conv3d", "STRATEGY_NAMES", "TensorMismatchError", "DtypeMismatchError",
]

#: The values the ``strategy`` argument of the functions here accepts, ``'auto'`` (the rule),
#: ``'benchmark'`` (time the strategies once per shape, keep the fastest) or a strategy's name.
STRATEGY_NAMES: Tuple[str, ...] = ("auto", "benchmark", *strategies.STRATEGIES)


def _strategy(
    name: str, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int, out_shape: Sequence[int],
) -> str:
    """The strategy ``name`` names, or for ``'auto'`` and ``'benchmark'`` the one the rule or the
    timing chooses, as far as the graph being recorded (if any) can hold it."""
    if x.shape[0] == 0:
        return "kernel_branches"  # the one strategy whose convolution takes an empty batch as it is
    if name not in ("auto", "benchmark"):
        return name
    if torch.jit.is_tracing():  # the traced graph must serve every batch size
        return "kernel_branches" if torch.onnx.is_in_onnx_export() else _TRACED
    # A symbolic batch under torch.export. Strict export traces with dynamo, to which a symbolic size
    # passes for an int, so there every exported batch counts as symbolic.
    if torch.compiler.is_exporting() and (torch.compiler.is_dynamo_compiling() or isinstance(x.shape[0], torch.SymInt)):
        return "kernel_branches"
    if name == "benchmark" and not torch.compiler.is_compiling():
        return strategies.benchmark(x, weight, attention, bias, stride, padding, dilation, groups)
    fused = "fused" in strategies.STRATEGIES and strategies.runs("fused", x)
    return strategies.choose(x.device.type, x.shape[0], weight, out_shape, fused)


#: What ``torch.jit.trace`` records instead of a strategy: batch-as-groups compiled by TorchScript.
_TRACED = "batch_as_groups_script"


@functools.lru_cache(maxsize=None)
def _scripted_batch_as_groups() -> Callable[..., Tensor]:
    return torch.jit.script(strategies.batch_as_groups_script)


def _autocast(tensors: Sequence[Optional[Tensor]], device_type: str) -> Sequence[Optional[Tensor]]:
    """Under ``torch.autocast``, cast as autocast casts a convolution's inputs: every
    float32/16 tensor to the autocast dtype (float64 stays as it is)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return [t.to(dtype) if t is not None and t.dtype in castable else t for t in tensors]


class _Plan(NamedTuple):
    """What the checks of one call found: everything that depends only on the tensors' shapes,
    dtypes and devices and on the other arguments."""

    unbatched: bool
    pad: Optional[List[int]]  # F.pad's amounts where 'same' pads one more at the end, else None
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    out_shape: Tuple[int, ...]
    strategy: Optional[str] = None  # the strategy to run, remembered where it cannot change between calls


def _check(
    dims: int, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: IntOrTuple,
    padding: Padding, dilation: IntOrTuple, groups: int, strategy: str,
) -> _Plan:
    """Check every argument of a call, with errors that name the bad value; the plan of the call."""
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {strategy!r}")
    if strategy in strategies.STRATEGIES and dims not in strategies.STRATEGIES[strategy].dims:
        supported = "/".join(str(d) for d in strategies.STRATEGIES[strategy].dims)
        raise ValueError(f"strategy {strategy!r} runs {supported}-D convolutions only, not {dims}-D")
    if x.dim() not in (dims + 1, dims + 2):
        raise TensorMismatchError(
            f"x must be {dims + 2}-D {input_text(dims)} or {dims + 1}-D {input_text(dims, batched=False)}, "
            f"got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    unbatched = x.dim() == dims + 1
    if unbatched:
        if attention.dim() != 1:
            raise TensorMismatchError(
                f"for unbatched x {input_text(dims, batched=False)} attention must be 1-D [K], "
                f"got shape {tuple(attention.shape)}"
            )
        x, attention = x.unsqueeze(0), attention.unsqueeze(0)
    groups_ = positive_int("groups", groups)
    check_tensors(x, weight, attention, bias, groups_)
    stride_, padding_, dilation_ = check_conv_args(
        dims, x.shape[1], weight.shape[1], groups_, stride, padding, dilation
    )
    before, after = explicit_padding(padding_, weight.shape[3:], dilation_)
    pad = None
    spatial = tuple(x.shape[2:])
    if before != after:  # 'same' with an even dilated kernel: F.conv2d pads one more at the end
        pad = [p for b, a in zip(reversed(before), reversed(after)) for p in (0, a - b)]
        spatial = tuple(n + a - b for n, b, a in zip(spatial, before, after))
    out_shape = check_output_shape(spatial, weight, stride_, before, dilation_)
    return _Plan(unbatched, pad, stride_, before, dilation_, groups_, out_shape)


#: The plans of recent calls, by what they depend on: a call like an earlier one skips the checks,
#: whose Python costs as much as the convolution of a small layer. Cleared when full.
_PLANS: Dict[Tuple[object, ...], _Plan] = {}
_MAX_PLANS = 256


def _plan_key(
    dims: int, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: IntOrTuple,
    padding: Padding, dilation: IntOrTuple, groups: int, strategy: str,
) -> Optional[Tuple[object, ...]]:
    """The key of a call's plan in :data:`_PLANS`; ``None`` while a graph is recorded (its sizes
    may be symbolic, and a graph runs the checks once anyway)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    # repr, not the values: 1 == 1.0 == True as keys, and only the int is valid.
    return (dims, x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, attention.shape,
            attention.dtype, attention.device, None if bias is None else (bias.shape, bias.dtype, bias.device),
            repr((stride, padding, dilation, groups, strategy)))


def _dynamic_conv(
    dims: int, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: IntOrTuple,
    padding: Padding, dilation: IntOrTuple, groups: int, strategy: str,
) -> Tensor:
    if torch._C._is_any_autocast_enabled():  # one test for every device type, cheaper than one per call
        x, weight, attention, bias = _autocast((x, weight, attention, bias), x.device.type)  # type: ignore[assignment]
    args = (dims, x, weight, attention, bias, stride, padding, dilation, groups, strategy)
    key = _plan_key(*args)
    try:
        plan = None if key is None else _PLANS.get(key)
    except TypeError:  # an unhashable size: a symbolic one, of a graph recorded outside torch.compile
        key = plan = None
    new = plan is None
    if plan is None:
        plan = _check(*args)
    if plan.unbatched:
        x, attention = x.unsqueeze(0), attention.unsqueeze(0)
    if plan.pad is not None:
        x = F.pad(x, plan.pad)
    stride_, before, dilation_, groups_ = plan.stride, plan.padding, plan.dilation, plan.groups
    name = plan.strategy or _strategy(strategy, x, weight, attention, bias, stride_, before, dilation_, groups_,
                                      plan.out_shape)
    if new and key is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan._replace(strategy=None if strategy == "benchmark" else name)  # benchmark: per thread count
    if name == "fused" and strategy in ("auto", "benchmark") and not strategies.eager():
        name = "kernel_branches"  # the plan was made in eager mode; a transform or mode watches this call
    if name == _TRACED:
        out = _scripted_batch_as_groups()(x, weight, attention, bias, list(stride_), list(before), list(dilation_),
                                          groups_)
    else:
        out = strategies.STRATEGIES[name].run(x, weight, attention, bias, stride_, before, dilation_, groups_)
    return out.squeeze(0) if plan.unbatched else out


_DOC = r"""Convolve each sample with its own attention-weighted mixture of K kernels ({dims}-D).

    For every sample ``b``::

        out[b] = conv{dims}d(x[b], sum_j attention[b, j] * weight[j],
                        sum_j attention[b, j] * bias[j])

    exactly (to rounding) and differentiably in ``x``, ``weight``, ``attention``
    and ``bias``. Arguments, shapes and errors follow :func:`torch.nn.functional.conv{dims}d`.

    Args:
        x: input ``{x}`` (any memory format; the output keeps it) or
            unbatched ``{x1}``. ``B = 0`` gives an empty output.
        weight: kernel bank ``Theta``, ``{bank}``.
        attention: mixing weights ``pi``, ``[B, K]`` (``[K]`` for unbatched ``x``).
        bias: bias bank ``[K, O]`` or ``None``.
        stride: step of the kernel over the input, an int or a tuple of {ints}.
        padding: zeros added to both sides of each spatial axis: an int, a tuple of {ints},
            ``'same'`` (the output as large as the input; stride 1 only) or ``'valid'`` (no padding).
        dilation: spacing between the kernel's taps, an int or a tuple of {ints}.
        groups: ``g``; each filter reads ``C/g`` input channels (``C`` and ``O`` divisible by ``g``).
        strategy: ``'auto'`` (the rule of :func:`dyconv_teach.strategies.choose`,
            per device), ``'benchmark'`` (the fastest strategy on this machine, timed on the
            first call of each shape: :func:`dyconv_teach.strategies.benchmark`), or the name
            of one of :data:`dyconv_teach.strategies.STRATEGIES` to force it (every strategy
            gives the same result). Graphs that serve every batch size replace the choice as
            the module docstring says.

    Returns:
        ``{out}`` with
        ``{first}' = floor(({first} + 2*padding[0] - dilation[0]*(k{first} - 1) - 1) / stride[0] + 1)``
        (and so on for every spatial axis).

    Under ``torch.autocast`` the convolution and the kernel mixing run in the
    autocast dtype, as ``F.conv{dims}d`` does; outside it all tensors must share a dtype.
    """


def _doc(dims: int) -> str:
    out = "[B, O, " + ", ".join(s + "'" for s in SPATIAL[dims]) + "]"
    return _DOC.format(dims=dims, x=input_text(dims), x1=input_text(dims, batched=False), bank=bank_text(dims),
                       out=out, first=SPATIAL[dims][0], ints="one int" if dims == 1 else f"{dims} ints")


def dynamic_conv1d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
    padding: Padding = 0, dilation: IntOrTuple = 1, groups: int = 1, *, strategy: str = "auto",
) -> Tensor:
    return _dynamic_conv(1, x, weight, attention, bias, stride, padding, dilation, groups, strategy)


def dynamic_conv2d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
    padding: Padding = 0, dilation: IntOrTuple = 1, groups: int = 1, *, strategy: str = "auto",
) -> Tensor:
    return _dynamic_conv(2, x, weight, attention, bias, stride, padding, dilation, groups, strategy)


def dynamic_conv3d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
    padding: Padding = 0, dilation: IntOrTuple = 1, groups: int = 1, *, strategy: str = "auto",
) -> Tensor:
    return _dynamic_conv(3, x, weight, attention, bias, stride, padding, dilation, groups, strategy)


for _dims, _fn in ((1, dynamic_conv1d), (2, dynamic_conv2d), (3, dynamic_conv3d)):
    _fn.__doc__ = _doc(_dims)
