"""Multiply-adds of a dynamic convolution layer, and the hooks that FLOP counters need.

- ``torch.utils.flop_counter.FlopCounterMode`` needs nothing: it counts the operations that run
  (a multiply-add counts as two FLOPs there).
- ptflops: ``backend="aten"`` also counts the operations that run. Its default backend counts
  modules by type and knows only torch's own, so it needs :func:`ptflops_hook`:
  ``get_model_complexity_info(model, shape, custom_modules_hooks={DynamicConv2d: ptflops_hook})``
  (the same hook for ``DynamicConv1d`` and ``DynamicConv3d``).
- fvcore: ``FlopCountAnalysis`` reads a ``torch.jit.trace`` of the model, in which the layer's
  convolution is a call of a TorchScript function (:func:`dyconv_teach.strategies.batch_as_groups_script`);
  fvcore skips calls unless told: ``FlopCountAnalysis(model, x).set_op_handle("prim::CallFunction",
  fvcore_handle)``.

ptflops and fvcore count one multiply-add as one operation, and so does :func:`layer_macs`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Sequence

from torch import nn

if TYPE_CHECKING:
    from .layers import _DynamicConvNd

__all__ = ["layer_macs", "ptflops_hook", "fvcore_handle"]


def _product(sizes: Sequence[int]) -> int:
    result = 1
    for n in sizes:
        result *= n
    return result


def _macs(
    input_shape: Sequence[int], bank_shape: Sequence[int], out_shape: Sequence[int], bias: bool
) -> Dict[str, int]:
    """Convolution and mixing multiply-adds of a batch ``[B, C, *spatial]`` with a bank
    ``[K, O, C/g, *kernel]`` and an output ``[B, O, *out]``."""
    B = input_shape[0]
    K, O = bank_shape[:2]
    kernel = _product(bank_shape[1:])  # O * C/g * prod(kernel): one sample's mixed kernel
    return {
        "convolution": B * kernel * _product(out_shape[2:]),  # one static convolution per sample
        "mixing": B * K * (kernel + (O if bias else 0)),  # sum_j pi[b, j] Theta_j, and the biases
    }


def layer_macs(layer: "_DynamicConvNd", input_shape: Sequence[int], output_shape: Sequence[int]) -> Dict[str, int]:
    """Multiply-adds of one forward of a dynamic convolution layer, by part: ``convolution`` (one
    static convolution per sample, with its own kernel), ``mixing`` (the kernels and biases, K per
    entry), ``pooling`` (the additions of the attention's average pooling) and ``attention`` (its
    two linear layers). Shapes are batched: ``[B, C, *spatial]`` in, ``[B, O, *out]`` out."""
    macs = _macs(input_shape, layer.bank.shape, output_shape, layer.bias is not None)
    B, C = input_shape[:2]
    macs["pooling"] = B * C * _product(input_shape[2:])
    linears = [m for m in (layer.fc1, layer.fc2) if isinstance(m, nn.Linear)]  # one under CondConv's routing
    macs["attention"] = B * sum(m.in_features * m.out_features for m in linears)
    return macs


def ptflops_hook(module: "_DynamicConvNd", inputs: Any, output: Any) -> None:
    """ptflops' hook for a dynamic convolution layer (its default, module-by-module backend): adds the
    convolution and pooling multiply-adds, and one addition per output for a bias as ptflops counts
    ``nn.Conv2d``'s, to ``module.__flops__``. ptflops counts the rest itself: the attention's two
    linear layers (modules) and the mixing (``torch.mm``, one of the functions it counts by default)."""
    x = inputs[0]
    batch = () if x.dim() == module._dims + 2 else (1,)  # unbatched: one sample
    macs = layer_macs(module, (*batch, *x.shape), (*batch, *output.shape))
    bias = output.numel() if module.bias is not None else 0
    module.__flops__ += macs["convolution"] + macs["pooling"] + bias  # type: ignore[operator, assignment]


def fvcore_handle(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore's op handle for ``prim::CallFunction``: the convolution and mixing multiply-adds of a
    call of :func:`dyconv_teach.strategies.batch_as_groups_script` (0 for any other function)."""
    function = inputs[0].node()
    if function.kind() != "prim::Constant" or "batch_as_groups_script" not in str(function):
        return 0
    x, bank, _, bias = (value.type() for value in inputs[1:5])
    has_bias = str(bias) != "NoneType"
    macs = _macs(x.sizes(), bank.sizes(), outputs[0].type().sizes(), has_bias)
    return macs["convolution"] + macs["mixing"]
