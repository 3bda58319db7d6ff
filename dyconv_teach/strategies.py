"""The exact ways to batch a dynamic convolution, and the rule that picks one.

Every strategy computes, for each sample ``b``, the convolution of ``x[b]`` with
its own kernel ``sum_j attention[b, j] * weight[j]`` (and bias), exactly up to
floating-point rounding, for 1, 2 and 3 spatial dimensions. Each is one function
of plain torch operations with the arguments already checked and normalised by
:func:`dyconv_teach.functional.dynamic_conv2d` (and its 1-D and 3-D siblings);
autograd differentiates it, so ``torch.func`` transforms, tracers and FLOP
counters see ordinary operations.

A dynamic convolution is two steps: *mixing* builds each sample's kernel from the
bank, and *batching* convolves every sample with its own kernel. Only the mixing
belongs to dynamic convolution; :func:`batch_as_groups_conv` is the batching step
for any per-sample kernels ``[B, O, C/g, *kernel]``, however they were built.

- ``batch_as_groups``: mix the kernels per sample, ``[B*O, C/g, *kernel]``, and run
  the batch as one grouped convolution with ``groups = B*g`` (the book's chapter 5).
- ``kernel_branches``: one static convolution with all ``K*O`` kernels, then mix
  the K outputs per sample (linearity, the book's chapter 4). K times the
  multiply-adds, but no per-sample weights, and no ``groups`` that depends on the batch.
- ``per_sample``: mix the kernels, then one ordinary convolution per sample.
- ``fused`` (2-D): kernels that mix each sample's kernel tile where the convolution consumes it,
  so the per-sample weights are never written: on a CPU in C, compiled at first use where a C
  compiler is found (:mod:`dyconv_teach.kernels.cpu_conv`), on CUDA in Triton, with the ``gpu``
  extra (:mod:`dyconv_teach.kernels.triton_conv`).

:func:`choose` is the dispatch rule, per device, from measurements.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import balanced_orders, memory_format, output_shape
from .kernels import cpu_conv

__all__ = [
    "Strategy",
    "STRATEGIES",
    "choose",
    "runs",
    "eager",
    "benchmark",
    "mix",
    "batch_as_groups_conv",
    "batch_as_groups",
    "batch_as_groups_script",
    "kernel_branches",
    "per_sample",
    "fused",
    "mixed_weight_bytes",
]

#: ``F.conv1d``, ``F.conv2d`` and ``F.conv3d`` by the number of spatial dimensions.
CONV: Dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
Ints = Sequence[int]


def like_input(out: Tensor, x: Tensor) -> Tensor:
    """``out`` in ``x``'s memory format, as ``F.conv2d`` returns it."""
    return out.contiguous(memory_format=memory_format(x))


def mix(weight: Tensor, attention: Tensor) -> Tensor:
    """The mixing step: every sample's kernel ``sum_j attention[b, j] * weight[j]``, as
    ``[B, O, C/g, *kernel]``, from the bank ``[K, O, C/g, *kernel]`` and ``attention [B, K]``."""
    K = weight.shape[0]
    # [B, K] @ [K, O*C/g*prod(kernel)]: after this product K is gone.
    return torch.mm(attention, weight.reshape(K, -1)).reshape(attention.shape[0], *weight.shape[1:])


# -- the batching step ---------------------------------------------------------------------------


def batch_as_groups_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints, dilation: Ints, groups: int
) -> Tensor:
    """The batching step: convolve each sample ``x[b]`` ``[C, *spatial]`` with its own kernel
    ``weight[b]`` ``[O, C/g, *kernel]`` (and bias ``bias[b]`` ``[O]``) in one grouped convolution,
    the batch folded into ``B*g`` groups. Arguments are checked and normalised (tuples, numeric
    padding); the output is ``[B, O, *out]`` in ``x``'s memory format.

    Under ``torch.compile`` it runs as one custom operator,
    ``torch.ops.dyconv_teach.batch_as_groups_conv``: a convolution whose ``groups`` depends on
    a symbolic batch size is more than the compiler's own convolution can take.
    """
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        op = torch.ops.dyconv_teach.batch_as_groups_conv
        return op(x, weight, bias, stride, padding, dilation, groups)
    B, C = x.shape[:2]
    O = weight.shape[1]
    # Move the batch into the channels so each sample is one group of C channels and
    # meets only its own kernels; reshape (not view), which copies a channels_last input.
    out = CONV[x.dim() - 2](
        x.reshape(1, B * C, *x.shape[2:]), weight.reshape(B * O, *weight.shape[2:]),
        None if bias is None else bias.reshape(B * O), stride, padding, dilation, B * groups,
    )
    return like_input(out.reshape(B, O, *out.shape[2:]), x)


@torch.library.custom_op("dyconv_teach::batch_as_groups_conv", mutates_args=())
def _batch_as_groups_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> Tensor:
    return batch_as_groups_conv(x, weight, bias, stride, padding, dilation, groups)  # eager here: the plain path


@_batch_as_groups_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):  # type: ignore[no-untyped-def]
    # weight [B, O, C/g, *kernel] has its kernel where a bank [K, O, C/g, *kernel] has it.
    out = output_shape(x.shape[2:], weight, stride, padding, dilation)
    return x.new_empty(x.shape[0], weight.shape[1], *out).contiguous(memory_format=memory_format(x))


@torch.library.custom_op("dyconv_teach::batch_as_groups_conv_backward", mutates_args=())
def _batch_as_groups_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    groups: int, mask: Sequence[bool],
) -> Tuple[Tensor, Tensor, Tensor]:
    B, C = x.shape[:2]
    O = weight.shape[1]
    dims = x.dim() - 2
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad.reshape(1, B * O, *grad.shape[2:]), x.reshape(1, B * C, *x.shape[2:]),
        weight.reshape(B * O, *weight.shape[2:]), [B * O], list(stride), list(padding), list(dilation), False,
        [0] * dims, B * groups, list(mask),
    )
    # Each gradient in the strides the fake below promises the compiler; an empty tensor
    # stands for a gradient that mask did not ask for.
    return (
        torch.empty_like(x).copy_(gx.reshape(x.shape)) if mask[0] else x.new_empty(0),
        gw.reshape(weight.shape).contiguous() if mask[1] else x.new_empty(0),
        gb.reshape(B, O) if mask[2] else x.new_empty(0),
    )


@_batch_as_groups_backward_op.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, mask):  # type: ignore[no-untyped-def]
    return (
        torch.empty_like(x) if mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if mask[1] else x.new_empty(0),
        x.new_empty(x.shape[0], weight.shape[1]) if mask[2] else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):  # type: ignore[no-untyped-def]
    x, weight = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1]), ctx.has_bias and ctx.needs_input_grad[2]]
    gx, gw, gb = _batch_as_groups_backward_op(grad, x, weight, *ctx.args, mask)
    return (gx if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None, None)


_batch_as_groups_op.register_autograd(_backward, setup_context=_setup_context)


# -- the strategies ------------------------------------------------------------------------------


def batch_as_groups(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
    dilation: Ints, groups: int,
) -> Tensor:
    """Mix every sample's kernel, then run the batch as ``B*g`` groups of one grouped convolution
    (for ``B = 1``, a plain convolution)."""
    batch_bias = None if bias is None else torch.mm(attention, bias)
    return batch_as_groups_conv(x, mix(weight, attention), batch_bias, stride, padding, dilation, groups)


def batch_as_groups_script(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
    dilation: List[int], groups: int,
) -> Tensor:
    """:func:`batch_as_groups` as TorchScript compiles it: what the layers run under
    ``torch.jit.script``, and what ``torch.jit.trace`` records, as a call of this function, so that
    ``groups = B*g`` is computed when the graph runs and one traced graph serves every batch size.
    The arguments as :func:`batch_as_groups` takes them, as lists; a contiguous output."""
    B, C, K, O = x.shape[0], x.shape[1], weight.shape[0], weight.shape[1]
    # TorchScript's sizes are List[int] (torch.Size for mypy): hence the ignores.
    kernels = torch.mm(attention, weight.reshape(K, -1)).reshape([B * O] + weight.shape[2:])  # type: ignore[operator]
    mixed_bias = None if bias is None else torch.mm(attention, bias).reshape(-1)
    folded = x.reshape([1, B * C] + x.shape[2:])  # type: ignore[operator]
    out = torch.convolution(folded, kernels, mixed_bias, stride, padding, dilation, False, [0 for _ in stride],
                            B * groups)
    return out.reshape([B, O] + out.shape[2:])  # type: ignore[operator]


def _stacked_bank(weight: Tensor, groups: int) -> Tensor:
    """The bank as one static weight ``[K*O, C/g, *kernel]`` laid out ``[g, K, O/g]``: a grouped
    convolution hands group i the i-th block of output channels, so block i holds its
    O/g channels of all K kernels."""
    K, O = weight.shape[:2]
    return weight.reshape(K, groups, O // groups, *weight.shape[2:]).transpose(0, 1).reshape(K * O, *weight.shape[2:])


def kernel_branches(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
    dilation: Ints, groups: int,
) -> Tensor:
    """All K kernels in one static convolution, the K outputs mixed per sample:
    ``sum_j pi[b, j] conv(x[b], Theta_j) = conv(x[b], sum_j pi[b, j] Theta_j)``."""
    B = x.shape[0]
    K, O = weight.shape[:2]
    out = CONV[x.dim() - 2](x, _stacked_bank(weight, groups), None, stride, padding, dilation, groups)
    branches = out.unflatten(1, (groups, K, O // groups))  # [B, g, K, O/g, *out]
    mixed = torch.einsum("bgjo...,bj->bgo...", branches, attention).flatten(1, 2)
    if bias is not None:
        mixed = mixed + torch.mm(attention, bias).reshape(B, O, *(1,) * (x.dim() - 2))
    return like_input(mixed, x)


def per_sample(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
    dilation: Ints, groups: int,
) -> Tensor:
    """Mix every sample's kernel, then one ordinary convolution per sample."""
    conv = CONV[x.dim() - 2]
    # split/unbind, not indexing: their backward joins the B gradients in one copy, where each
    # x[b] or kernels[b] would make a zero tensor of the whole batch's size for its gradient.
    kernels = mix(weight, attention).unbind(0)
    biases: Sequence[Optional[Tensor]] = [None] * x.shape[0] if bias is None else torch.mm(attention, bias).unbind(0)
    outs = [conv(x_b, k_b, b_b, stride, padding, dilation, groups)
            for x_b, k_b, b_b in zip(x.split(1), kernels, biases)]
    return like_input(torch.cat(outs), x)


def _fused_kernels(x: Tensor) -> Any:
    """The fused kernels for ``x``'s device: C for a CPU, Triton for CUDA (the ``gpu`` extra,
    imported on first use)."""
    if x.device.type == "cpu":
        return cpu_conv
    from .kernels import triton_conv  # Triton is an optional extra

    return triton_conv


class _Fused(torch.autograd.Function):
    """The fused kernels of :mod:`dyconv_teach.kernels` as one autograd node."""

    @staticmethod
    def forward(  # type: ignore[override]
        x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
        dilation: Ints, groups: int,
    ) -> Tensor:
        out = _fused_kernels(x).fused_forward(x, weight, attention, bias, stride, padding, dilation, groups)
        return like_input(out, x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        x, weight, attention, bias, *conv = inputs
        ctx.save_for_backward(x, weight, attention, bias)
        ctx.conv = conv

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, weight, attention, bias = ctx.saved_tensors
        mask = [bool(n) for n in ctx.needs_input_grad[:4]]
        if torch.is_grad_enabled():
            # A gradient that will be differentiated again (create_graph=True): the kernels'
            # gradients are not differentiable, batch-as-groups' are, and equal.
            inputs = [t for t, m in zip((x, weight, attention, bias), mask) if m]
            out = batch_as_groups(x, weight, attention, bias, *ctx.conv)
            found = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
            grads = [next(found) if m else None for m in mask]
        else:
            grads = _fused_kernels(x).fused_backward(grad, x, weight, attention, bias, *ctx.conv, mask)
        return (*grads, None, None, None, None)


def fused(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
    dilation: Ints, groups: int,
) -> Tensor:
    """Convolution as a GEMM that mixes each sample's kernel tile where it is consumed and never
    writes the per-sample weights, forward and backward (2-D): on a CPU the C kernels of
    :mod:`dyconv_teach.kernels.cpu_conv` (float32, float64; compiled at first use), on CUDA the
    Triton kernels of :mod:`dyconv_teach.kernels.triton_conv` (the ``gpu`` extra)."""
    return _Fused.apply(x, weight, attention, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


# -- the registry and the dispatch rule -------------------------------------------------------


class Strategy(NamedTuple):
    """A strategy: ``run(x, weight, attention, bias, stride, padding, dilation, groups) -> out``,
    and the device types and numbers of spatial dimensions it runs on."""

    run: Callable[..., Tensor]
    devices: Tuple[str, ...] = ("cpu", "cuda")
    dims: Tuple[int, ...] = (1, 2, 3)


#: Every strategy the core can run, by name (``fused`` on a CPU where a C compiler is found, on
#: CUDA where Triton is installed).
STRATEGIES: Dict[str, Strategy] = {
    "batch_as_groups": Strategy(batch_as_groups),
    "kernel_branches": Strategy(kernel_branches),
    "per_sample": Strategy(per_sample),
}
_FUSED_DEVICES = tuple(device for device, built in (("cpu", cpu_conv.compiler() is not None),
                                                    ("cuda", importlib.util.find_spec("triton") is not None)) if built)
if _FUSED_DEVICES:
    STRATEGIES["fused"] = Strategy(fused, devices=_FUSED_DEVICES, dims=(2,))


def mixed_weight_bytes(batch: int, weight: Tensor) -> int:
    """Bytes of the per-sample weights ``[B*O, C/g, *kernel]`` that batch-as-groups builds."""
    return batch * (weight.numel() // weight.shape[0]) * weight.element_size()


# The thresholds of the rule below, per device type: the K-branch sum is chosen when the
# mixed weights exceed BYTES and (K - 1) * prod(output size) <= WORK (an output so small that K - 1
# extra static convolutions cost less than building and reading those weights). Measured
# with `python -m dyconv_teach.bench` (CPU: torch 2.13, 2 threads) and tools/gpu_check.py
# (CUDA: an H200, torch 2.11, where the fused kernels were never clearly faster, so the rule
# does not choose them); the README's section "The measurements behind the dispatch rule".
_K_BRANCH_RULE: Dict[str, Tuple[int, int]] = {
    "cpu": (32 * 2**20, 256),
    "cuda": (64 * 2**20, 600),
}


def runs(name: str, x: Tensor) -> bool:
    """Whether the strategy ``name`` runs on ``x``'s device, number of dimensions and dtype."""
    s = STRATEGIES[name]
    if x.device.type not in s.devices or x.dim() - 2 not in s.dims:
        return False
    return name != "fused" or x.device.type != "cpu" or x.dtype in cpu_conv.DTYPES


def eager() -> bool:
    """Whether no compiler, tracer, ``torch.func`` transform or torch mode (a FLOP counter, a
    ``with torch.device(...)`` block) is watching the call: the fused kernels are opaque to all
    of them, so ``'auto'`` and ``'benchmark'`` pick them only here."""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()
                or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled())


def choose(device_type: str, batch: int, weight: Tensor, out_shape: Sequence[int], fused: bool = False) -> str:
    """The strategy :func:`~dyconv_teach.functional.dynamic_conv2d` runs on ``device_type``
    for ``batch`` samples, the bank ``weight`` ``[K, O, C/g, *kernel]`` and an output of
    spatial size ``out_shape``; ``fused``: whether the fused kernels can run the call (on a
    CPU they are chosen where the K-branch sum would be, and measured faster there)."""
    big, work = _K_BRANCH_RULE.get(device_type, _K_BRANCH_RULE["cpu"])
    K = weight.shape[0]
    pixels = 1
    for n in out_shape:
        pixels *= n
    # The shape test first: under torch.compile the batch is symbolic, and each test of it is a guard.
    if (K - 1) * pixels <= work and mixed_weight_bytes(batch, weight) > big:
        return "fused" if fused and device_type == "cpu" else "kernel_branches"
    return "batch_as_groups"


_BENCHMARKED: Dict[Tuple[object, ...], str] = {}


def benchmark(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], stride: Ints, padding: Ints,
    dilation: Ints, groups: int,
) -> str:
    """The fastest strategy for this call, timed once per shape, dtype, device and thread count and
    then remembered (as ``torch.backends.cudnn.benchmark`` does for convolution algorithms).

    Every strategy that runs on the device and dimension is timed on copies of the inputs:
    forward and backward where autograd would run a backward (grad mode on and an input that
    requires grad), else forward only; one warm-up, then rounds in the orders of a Williams
    design (each strategy runs right after each other one equally often), the median kept.
    The first call of a shape therefore costs a few forward and backward passes per strategy;
    later calls only a dictionary lookup.
    """
    tensors = [x, weight, attention, bias]
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    key = (x.device, x.dtype, tuple(x.shape), memory_format(x), tuple(weight.shape), bias is not None,
           tuple(stride), tuple(padding), tuple(dilation), groups, grad, torch.get_num_threads())
    if key not in _BENCHMARKED:
        names = [n for n in STRATEGIES if runs(n, x)]
        copies = [None if t is None else t.detach().requires_grad_(grad and t.requires_grad) for t in tensors]
        leaves = [t for t in copies if t is not None and t.requires_grad]

        def run(name: str) -> float:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            out = STRATEGIES[name].run(*copies, stride, padding, dilation, groups)
            if leaves:
                torch.autograd.grad(out, leaves, torch.ones_like(out))
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            return time.perf_counter() - start

        for name in names:
            run(name)
        times: Dict[str, List[float]] = {name: [] for name in names}
        for order in balanced_orders(len(names)):
            for i in order:
                times[names[i]].append(run(names[i]))
        _BENCHMARKED[key] = min(names, key=lambda n: statistics.median(times[n]))
    return _BENCHMARKED[key]
