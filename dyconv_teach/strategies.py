"""The exact ways to batch a dynamic convolution, and the rule that picks one.

Every strategy computes, for each sample ``b``, the convolution of ``x[b]`` with
its own kernel ``sum_j attention[b, j] * weight[j]`` (and bias), exactly up to
floating-point rounding. Each is a pair of plain functions, a forward and its
backward, with the arguments already checked and normalised by
:func:`dyconv_teach.functional.dynamic_conv2d`, which runs them inside one
custom operator so that compiled and exported graphs keep a symbolic batch size.

- ``batch_as_groups``: mix the kernels per sample, ``[B*O, C/g, kH, kW]``, and run
  the batch as one grouped convolution with ``groups = B*g`` (the book's chapter 5).
- ``kernel_branches``: one static convolution with all ``K*O`` kernels, then mix
  the K outputs per sample (linearity, the book's chapter 4). K times the
  multiply-adds, but no per-sample weights.
- ``fused`` (with the ``gpu`` extra, Triton): kernels that mix each sample's kernel
  tile where the convolution consumes it, so the per-sample weights are never
  written (:mod:`dyconv_teach.triton_conv`).

:func:`choose` is the dispatch rule, per device, from measurements.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._utils import memory_format

__all__ = ["Strategy", "STRATEGIES", "choose", "mixed_weight_bytes"]

Grads = Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]
Pair = Sequence[int]


def _channels_last(x: Tensor) -> bool:
    return memory_format(x) == torch.channels_last


def like_input(out: Tensor, x: Tensor) -> Tensor:
    """``out`` in ``x``'s memory format, as ``F.conv2d`` returns it."""
    return out.contiguous(memory_format=memory_format(x))


def _conv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    bias_size: Optional[int],
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    groups: int,
    mask: Tuple[bool, bool, bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    """``F.conv2d``'s gradients (input, weight, bias) through the aten operator autograd itself uses."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None if bias_size is None else [bias_size], list(stride), list(padding), list(dilation),
        False, [0, 0], groups, list(mask),
    )


# -- batch as groups ----------------------------------------------------------------------------


def _mixed_weight(weight: Tensor, attention: Tensor) -> Tensor:
    """Every sample's kernel, stacked on the output axis: ``[B*O, C/g, kH, kW]``."""
    K, O = weight.shape[:2]
    B = attention.shape[0]
    # [B, K] @ [K, O*C/g*kH*kW] -> [B, O*C/g*kH*kW]: after this product K is gone.
    return torch.mm(attention, weight.reshape(K, -1)).reshape(B * O, *weight.shape[2:])


def batch_as_groups_forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Pair, padding: Pair, dilation: Pair,
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """The batch as ``B*g`` groups of one grouped ``F.conv2d`` (for ``B = 1``, a plain convolution)."""
    B, C, H, W = x.shape
    O = weight.shape[1]
    batch_bias = None if bias is None else torch.mm(attention, bias).reshape(B * O)
    # Move the batch into the channels so each sample is one group of C channels and
    # meets only its own kernels; reshape (not view), which copies a channels_last input.
    out = torch.nn.functional.conv2d(
        x.reshape(1, B * C, H, W), _mixed_weight(weight, attention), batch_bias, stride, padding, dilation, B * groups
    )
    return like_input(out.reshape(B, O, *out.shape[2:]), x), x.new_empty(0)


def batch_as_groups_backward(
    grad: Tensor, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], saved: Tensor, stride: Pair,
    padding: Pair, dilation: Pair, groups: int, mask: Sequence[bool],
) -> Grads:
    """Gradients of :func:`batch_as_groups_forward`. The mixed weights are recomputed
    (one small matrix product) rather than kept: they are as large as the batch."""
    B, C, H, W = x.shape
    K, O = weight.shape[:2]
    need_x, need_w, need_a, need_b = mask
    per_sample_w = need_w or need_a
    per_sample_b = bias is not None and (need_b or need_a)
    gx, gw_b, gb_b = _conv_backward(
        grad.reshape(1, B * O, *grad.shape[2:]), x.reshape(1, B * C, H, W), _mixed_weight(weight, attention),
        B * O if bias is not None else None, stride, padding, dilation, B * groups,
        (need_x, per_sample_w, per_sample_b),
    )
    # Per-sample gradients [B, ...] go back through the mixing product [B, K] @ [K, ...].
    gw_flat = gw_b.reshape(B, -1) if per_sample_w else None
    gb_flat = gb_b.reshape(B, O) if per_sample_b else None
    grad_attention = None
    if need_a:
        grad_attention = torch.mm(gw_flat, weight.reshape(K, -1).t())  # type: ignore[arg-type]
        if gb_flat is not None:
            grad_attention = grad_attention + torch.mm(gb_flat, bias.t())  # type: ignore[union-attr]
    return (
        like_input(gx.reshape(B, C, H, W), x) if need_x else None,
        torch.mm(attention.t(), gw_flat).reshape(weight.shape) if need_w else None,  # type: ignore[arg-type]
        grad_attention,
        torch.mm(attention.t(), gb_flat) if need_b and gb_flat is not None else None,
    )


# -- K-branch sum -------------------------------------------------------------------------------


def _stacked_bank(weight: Tensor, groups: int) -> Tensor:
    """The bank as one static weight ``[K*O, C/g, kH, kW]`` laid out ``[g, K, O/g]``: a grouped
    convolution hands group i the i-th block of output channels, so block i holds its
    O/g channels of all K kernels."""
    K, O = weight.shape[:2]
    return weight.reshape(K, groups, O // groups, *weight.shape[2:]).transpose(0, 1).reshape(K * O, *weight.shape[2:])


def kernel_branches_forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Pair, padding: Pair, dilation: Pair,
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """All K kernels in one static ``F.conv2d``, the K outputs mixed per sample:
    ``sum_j pi[b, j] conv(x[b], Theta_j) = conv(x[b], sum_j pi[b, j] Theta_j)``.

    Also returns the K branch outputs, flattened in memory order: the attention's
    gradient needs them.
    """
    B = x.shape[0]
    K, O = weight.shape[:2]
    out = like_input(
        torch.nn.functional.conv2d(x, _stacked_bank(weight, groups), None, stride, padding, dilation, groups), x
    )
    branches = out.reshape(B, groups, K, O // groups, *out.shape[2:])
    mixed = torch.einsum("bgjohw,bj->bgohw", branches, attention).reshape(B, O, *out.shape[2:])
    if bias is not None:
        mixed = mixed + torch.mm(attention, bias)[:, :, None, None]
    # 1-D in memory order (a view, no copy), as the operator's saved tensor must be.
    flat = out.permute(0, 2, 3, 1) if _channels_last(x) else out
    return like_input(mixed, x), flat.reshape(-1)


def kernel_branches_backward(
    grad: Tensor, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], saved: Tensor, stride: Pair,
    padding: Pair, dilation: Pair, groups: int, mask: Sequence[bool],
) -> Grads:
    """Gradients of :func:`kernel_branches_forward`; ``saved`` holds its branch outputs."""
    B = x.shape[0]
    K, O = weight.shape[:2]
    need_x, need_w, need_a, need_b = mask
    grad_g = grad.reshape(B, groups, O // groups, *grad.shape[2:])
    gx = gw = None
    if need_x or need_w:
        grad_branches = torch.einsum("bgohw,bj->bgjohw", grad_g, attention).reshape(B, K * O, *grad.shape[2:])
        gx, gw_stacked, _ = _conv_backward(
            grad_branches, x, _stacked_bank(weight, groups), None, stride, padding, dilation, groups,
            (need_x, need_w, False),
        )
        if need_w:
            gw = gw_stacked.reshape(groups, K, O // groups, *weight.shape[2:]).transpose(0, 1).reshape(weight.shape)
    grad_sum = grad.sum(dim=(2, 3)) if bias is not None and (need_a or need_b) else None  # [B, O]
    grad_attention = None
    if need_a:
        H, W = grad.shape[2:]
        out = saved.reshape(B, H, W, K * O).permute(0, 3, 1, 2) if _channels_last(x) else saved.reshape(B, K * O, H, W)
        branches = out.reshape(B, groups, K, O // groups, H, W)
        grad_attention = torch.einsum("bgohw,bgjohw->bj", grad_g, branches)
        if grad_sum is not None:
            grad_attention = grad_attention + torch.mm(grad_sum, bias.t())  # type: ignore[union-attr]
    return (
        like_input(gx, x) if gx is not None and need_x else None,
        gw,
        grad_attention,
        torch.mm(attention.t(), grad_sum) if need_b and grad_sum is not None else None,
    )


# -- fused Triton kernels -----------------------------------------------------------------------


def fused_forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Pair, padding: Pair, dilation: Pair,
    groups: int,
) -> Tuple[Tensor, Tensor]:
    """:func:`dyconv_teach.triton_conv.fused_forward`: an implicit GEMM that mixes each
    sample's kernel tile on the fly and never writes the per-sample weights (CUDA, or CPU
    tensors under Triton's interpreter)."""
    from . import triton_conv  # Triton is an optional extra, imported on first use

    out = triton_conv.fused_forward(x, weight, attention, bias, tuple(stride), tuple(padding),  # type: ignore[arg-type]
                                    tuple(dilation), groups)  # type: ignore[arg-type]
    return out, x.new_empty(0)


def fused_backward(
    grad: Tensor, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], saved: Tensor, stride: Pair,
    padding: Pair, dilation: Pair, groups: int, mask: Sequence[bool],
) -> Grads:
    """Gradients of :func:`fused_forward` (two more fused kernels: input gradient; bank and
    attention gradients reduced inside the kernel)."""
    from . import triton_conv

    return triton_conv.fused_backward(grad, x, weight, attention, bias, tuple(stride), tuple(padding),  # type: ignore[arg-type]
                                      tuple(dilation), groups, mask)  # type: ignore[arg-type]


# -- the registry and the dispatch rule -------------------------------------------------------


class Strategy(NamedTuple):
    """A forward ``(x, weight, attention, bias, stride, padding, dilation, groups) -> (out, saved)``,
    its backward ``(grad, x, weight, attention, bias, saved, stride, padding, dilation, groups,
    mask) -> (grad_x, grad_weight, grad_attention, grad_bias)``, and the device types it runs on."""

    forward: Callable[..., Tuple[Tensor, Tensor]]
    backward: Callable[..., Grads]
    devices: Tuple[str, ...] = ("cpu", "cuda")


#: Every strategy the core can run, by name (``fused`` where Triton is installed).
STRATEGIES: Dict[str, Strategy] = {
    "batch_as_groups": Strategy(batch_as_groups_forward, batch_as_groups_backward),
    "kernel_branches": Strategy(kernel_branches_forward, kernel_branches_backward),
}
if importlib.util.find_spec("triton") is not None:
    # On CPU tensors the kernels run only under Triton's interpreter, for tests and teaching.
    STRATEGIES["fused"] = Strategy(fused_forward, fused_backward, devices=("cuda",))


def mixed_weight_bytes(batch: int, weight: Tensor) -> int:
    """Bytes of the per-sample weights ``[B*O, C/g, kH, kW]`` that batch-as-groups builds."""
    return batch * weight[0].numel() * weight.element_size()


# The thresholds of the rule below, per device type: the K-branch sum is chosen when the
# mixed weights exceed BYTES and (K - 1) * H' * W' <= WORK (an output so small that K - 1
# extra static convolutions cost less than building and reading those weights). Measured
# with `python -m dyconv_teach.bench` (CPU: torch 2.13, 2 threads) and tools/gpu_check.py
# (CUDA: an H200, torch 2.11, where the fused kernels were never clearly faster, so the rule
# does not choose them); the README's section "The measurements behind the dispatch rule".
_K_BRANCH_RULE: Dict[str, Tuple[int, int]] = {
    "cpu": (32 * 2**20, 256),
    "cuda": (64 * 2**20, 600),
}


def choose(device_type: str, batch: int, weight: Tensor, out_hw: Tuple[int, int]) -> str:
    """The strategy :func:`~dyconv_teach.functional.dynamic_conv2d` runs on ``device_type``
    for ``batch`` samples, the bank ``weight`` ``[K, O, C/g, kH, kW]`` and an output of ``out_hw``."""
    big, work = _K_BRANCH_RULE.get(device_type, _K_BRANCH_RULE["cpu"])
    K = weight.shape[0]
    if mixed_weight_bytes(batch, weight) > big and (K - 1) * out_hw[0] * out_hw[1] <= work:
        return "kernel_branches"
    return "batch_as_groups"
