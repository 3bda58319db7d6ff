"""Exact batched core of dynamic convolution: :func:`dynamic_conv2d`.

Dynamic convolution (Chen et al., "Dynamic Convolution: Attention over
Convolution Kernels", CVPR 2020, arXiv:1912.03458) gives every sample ``b`` its
own kernel ``sum_j pi[b, j] * Theta_j``. ``F.conv2d`` takes one 4-D weight for
the whole batch, so the batch has to be folded into something it does accept:
:mod:`dyconv_teach.strategies` holds the exact ways to do that.

They run inside one custom operator, ``torch.ops.dyconv_teach.dynamic_conv2d``,
with a backward of its own. The batch size decides the strategy (and, for
batch-as-groups, the ``groups`` of the convolution), so graph tracers
(``torch.compile``, ``torch.export``, ``torch.jit.trace``) must see the operator
as one opaque call; then one graph serves every batch size.

Nothing here is teaching code: :mod:`dyconv_teach.reference` holds the slow,
obviously correct versions that the tests compare against.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from . import strategies
from ._utils import (
    IntPair,
    Padding,
    autocast_dtype,
    check_conv_args,
    check_output_hw,
    check_tensors,
    output_hw,
    positive_int,
    same_padding,
)

__all__ = ["dynamic_conv2d", "STRATEGY_NAMES"]

#: What the ``strategy`` argument of :func:`dynamic_conv2d` accepts.
STRATEGY_NAMES: Tuple[str, ...] = ("auto", *strategies.STRATEGIES)


def _strategy(name: str, x: Tensor, weight: Tensor, out_hw: Tuple[int, int]) -> strategies.Strategy:
    """The strategy ``name`` names, or for ``'auto'`` the one the rule chooses (the same in
    the forward and the backward, which see the same shapes)."""
    if name == "auto":
        name = strategies.choose(x.device.type, x.shape[0], weight, out_hw)
    return strategies.STRATEGIES[name]


def _forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int, strategy: str,
) -> Tuple[Tensor, Tensor]:
    out_hw = output_hw(x, weight, stride, padding, dilation)
    if x.shape[0] == 0:
        return x.new_empty(0, weight.shape[1], *out_hw), x.new_empty(0)
    run = _strategy(strategy, x, weight, out_hw)
    return run.forward(x, weight, attention, bias, stride, padding, dilation, groups)


@torch.library.custom_op("dyconv_teach::dynamic_conv2d", mutates_args=())
def _op(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    strategy: str,
) -> Tuple[Tensor, Tensor]:
    """``(out, saved)``: ``saved`` is what the strategy's backward needs besides the inputs."""
    return _forward(x, weight, attention, bias, stride, padding, dilation, groups, strategy)


@_op.register_fake
def _(x, weight, attention, bias, stride, padding, dilation, groups, strategy):  # type: ignore[no-untyped-def]
    if not isinstance(x.shape[0], torch.SymInt):  # a concrete batch (meta tensors): run the real code
        return _forward(x, weight, attention, bias, stride, padding, dilation, groups, strategy)
    out_hw = output_hw(x, weight, stride, padding, dilation)
    out = strategies.like_input(x.new_empty(x.shape[0], weight.shape[1], *out_hw), x)
    # Only the operator knows which strategy a symbolic batch will get, so not how much it saves.
    return out, x.new_empty(torch.library.get_ctx().new_dynamic_size())


@torch.library.custom_op("dyconv_teach::dynamic_conv2d_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor],
    saved: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    strategy: str,
    mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four gradients; an empty tensor stands for one that ``mask`` did not ask for."""
    grads: Sequence[Optional[Tensor]]
    if x.shape[0] == 0:
        grads = (torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(attention),
                 None if bias is None else torch.zeros_like(bias))
    else:
        run = _strategy(strategy, x, weight, (grad.shape[2], grad.shape[3]))
        grads = run.backward(grad, x, weight, attention, bias, saved, stride, padding, dilation, groups, mask)
    # Each gradient in its input's strides, as the fake below promises graph compilers.
    inputs = (x, weight, attention, bias)
    return tuple(  # type: ignore[return-value]
        x.new_empty(0) if g is None or t is None or not m
        else g if g.stride() == t.stride() else torch.empty_like(t).copy_(g)
        for g, t, m in zip(grads, inputs, mask)
    )


@_backward_op.register_fake
def _(grad, x, weight, attention, bias, saved, stride, padding, dilation, groups, strategy, mask):  # type: ignore[no-untyped-def]
    inputs = (x, weight, attention, bias)
    return tuple(torch.empty_like(t) if m and t is not None else x.new_empty(0) for t, m in zip(inputs, mask))


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, attention, bias, stride, padding, dilation, groups, strategy = inputs
    ctx.save_for_backward(x, weight, attention, bias, output[1])
    ctx.args = (stride, padding, dilation, groups, strategy)


def _autograd_backward(ctx, grad, _grad_saved):  # type: ignore[no-untyped-def]
    x, weight, attention, bias, saved = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:4]]
    mask[3] = mask[3] and bias is not None
    grads = _backward_op(grad, x, weight, attention, bias, saved, *ctx.args, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), None, None, None, None, None)


_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# torch.utils.flop_counter counts what the computation needs, whatever strategy runs it:
# one convolution per sample with its mixed kernel, plus the mixing [B, K] @ [K, O*C/g*kH*kW].
def _conv_and_mix_flops(x_shape: Sequence[int], weight_shape: Sequence[int], out_hw: Sequence[int]) -> Tuple[int, int]:
    B = x_shape[0]
    K, O, c, kh, kw = weight_shape
    return 2 * B * O * c * kh * kw * out_hw[0] * out_hw[1], 2 * B * K * O * c * kh * kw


@register_flop_formula(torch.ops.dyconv_teach.dynamic_conv2d)
def _forward_flops(x_shape, weight_shape, *args, out_shape, **kwargs) -> int:  # type: ignore[no-untyped-def]
    conv, mix = _conv_and_mix_flops(x_shape, weight_shape, out_shape[0][2:])
    return conv + mix


@register_flop_formula(torch.ops.dyconv_teach.dynamic_conv2d_backward)
def _backward_flops(grad_shape, x_shape, weight_shape, *args, out_shape, **kwargs) -> int:  # type: ignore[no-untyped-def]
    need_x, need_w, need_a, _ = args[-1]
    conv, mix = _conv_and_mix_flops(x_shape, weight_shape, grad_shape[2:])
    # A convolution for the input gradient and one for the per-sample weight gradient; the
    # mixed kernels are rebuilt (one mix), and the per-sample weight gradient goes back
    # through the mixing to the bank and to the attention (one mix each).
    convs = need_x + (need_w or need_a)
    mixes = (need_x or need_w or need_a) + need_w + need_a
    return int(convs * conv + mixes * mix)


# -- the public function ------------------------------------------------------------------------


def _autocast(tensors: Sequence[Optional[Tensor]], device_type: str) -> Sequence[Optional[Tensor]]:
    """Under ``torch.autocast``, cast as autocast casts a convolution's inputs: every
    float32/16 tensor to the autocast dtype (float64 stays as it is)."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return [t.to(dtype) if t is not None and t.dtype in castable else t for t in tensors]


def dynamic_conv2d(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    strategy: str = "auto",
) -> Tensor:
    r"""Convolve each sample with its own attention-weighted mixture of K kernels.

    For every sample ``b``::

        out[b] = conv2d(x[b], sum_j attention[b, j] * weight[j],
                        sum_j attention[b, j] * bias[j])

    exactly (to rounding) and differentiably in ``x``, ``weight``, ``attention``
    and ``bias``. Arguments, shapes and errors follow :func:`torch.nn.functional.conv2d`.

    Args:
        x: input ``[B, C, H, W]`` (any memory format; the output keeps it) or
            unbatched ``[C, H, W]``. ``B = 0`` gives an empty output.
        weight: kernel bank ``Theta``, ``[K, O, C/groups, kH, kW]``.
        attention: mixing weights ``pi``, ``[B, K]`` (``[K]`` for unbatched ``x``).
        bias: bias bank ``[K, O]`` or ``None``.
        stride, padding, dilation, groups: as in :func:`torch.nn.functional.conv2d`
            (``padding`` may be ``'same'`` or ``'valid'``).
        strategy: ``'auto'`` (the rule of :func:`dyconv_teach.strategies.choose`,
            per device) or the name of one of :data:`dyconv_teach.strategies.STRATEGIES`
            to force it (for benchmarks and tests; every strategy gives the same result).

    Returns:
        ``[B, O, H', W']`` with
        ``H' = floor((H + 2*padding[0] - dilation[0]*(kH - 1) - 1) / stride[0] + 1)``.

    Under ``torch.autocast`` the convolution and the kernel mixing run in the
    autocast dtype, as ``F.conv2d`` does; outside it all tensors must share a dtype.
    """
    if strategy not in STRATEGY_NAMES:
        raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {strategy!r}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"x must be 4-D [B, C, H, W] or 3-D [C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}"
        )
    unbatched = x.dim() == 3
    if unbatched:
        if attention.dim() != 1:
            raise ValueError(f"for unbatched x [C, H, W] attention must be 1-D [K], got shape {tuple(attention.shape)}")
        x, attention = x.unsqueeze(0), attention.unsqueeze(0)
    x, weight, attention, bias = _autocast((x, weight, attention, bias), x.device.type)  # type: ignore[assignment]
    groups_ = positive_int("groups", groups)
    check_tensors(x, weight, attention, bias, groups_)
    stride_, padding_, dilation_ = check_conv_args(x.shape[1], weight.shape[1], groups_, stride, padding, dilation)
    if padding_ == "same":
        top, bottom, left, right = same_padding((weight.shape[3], weight.shape[4]), dilation_)
        if (top, left) != (bottom, right):  # an even dilated kernel: F.conv2d pads one more at the end
            x = F.pad(x, (0, right - left, 0, bottom - top))
        padding_ = (top, left)
    elif padding_ == "valid":
        padding_ = (0, 0)
    check_output_hw(x, weight, stride_, padding_, dilation_)  # type: ignore[arg-type]
    out = _op(x, weight, attention, bias, stride_, padding_, dilation_, groups_, strategy)[0]  # type: ignore[arg-type]
    return out.squeeze(0) if unbatched else out

