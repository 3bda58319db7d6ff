"""The dynamic-convolution family as mixing steps over one batching step (the book's chapter 11).

CondConv (Yang et al., NeurIPS 2019, arXiv:1904.04971), DyConv (Chen et al., CVPR 2020,
arXiv:1912.03458), ODConv (Li, Zhou and Yao, ICLR 2022, arXiv:2209.07947) and DCD (Li et al.,
ICLR 2021, arXiv:2103.08756) differ only in how they build every sample's kernel
``[B, O, C/g, k, k]`` (and bias ``[B, O]``): the *mixing step*. The *batching step* that convolves
each sample with its own kernel is the same for all four,
:func:`dyconv_teach.strategies.batch_as_groups_conv`.

- :func:`build_layer`: a layer of each variant (``DynamicConv2d`` with CondConv's or DyConv's
  routing, ``ODConv2d``, or :class:`DCD2d`), in float64 and eval mode.
- :func:`mix_kernels`: the variant's mixing step, every intermediate shape read off its tensor.
- :func:`batch`, :func:`per_sample_loop`: the batching step, and the loop it must equal.
- :func:`family_shapes`: all of it for one setting (what the chapter's explorer shows).
- :func:`parameter_parts`, :func:`multiply_adds`: a layer's parameters by part, and the multiply-adds
  of its own forward as ``torch.utils.flop_counter`` counts them.

Everything here needs torch alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ..layers import DynamicConv2d
from ..odconv import ODConv2d
from ..strategies import batch_as_groups_conv, mix
from .shapes import EXAMPLE, ConvCall, Shape, record_conv_calls

__all__ = [
    "VARIANTS",
    "DCD2d",
    "FamilyLayer",
    "build_layer",
    "Step",
    "Mixed",
    "mix_kernels",
    "conv_arguments",
    "batch",
    "per_sample_loop",
    "FamilyShapes",
    "family_shapes",
    "parameter_parts",
    "multiply_adds",
]

#: The four variants, in the order of the chapter (and of the explorer's menu).
VARIANTS = ("CondConv", "DyConv", "ODConv", "DCD")


def _hsigmoid(x: Tensor) -> Tensor:
    # The official DCD code's Hsigmoid: relu6(x + 3) / 3, which runs from 0 to 2 (torch's
    # F.hardsigmoid divides by 6 and runs from 0 to 1).
    return F.relu6(x + 3.0) / 3.0


class DCD2d(nn.Module):
    """Dynamic convolution decomposition (Li et al., ICLR 2021, arXiv:2103.08756) for an odd
    ``k x k`` kernel, as the official code builds it (liyunsheng13/dcd,
    ``models/imagenet/resnet_dcd.py``, class ``conv_basic_dy`` for ``pool=2``, the blocks of
    ResNet-18 and ResNet-34; class ``conv_dy`` for ``pool=1``, the layers of ResNet-50):

    ``y = Lambda(x) * conv(x, Theta_s) + P (bn2(Phi(x) u) + u)``, with ``u = bn1(q(x))``,

    where ``Theta_s`` ``[O, C, k, k]`` is the static kernel, ``Lambda(x)`` ``[B, O]`` scales its output
    channels, ``Q`` (a 1 x 1 convolution, ``C -> L``) projects the input into a latent space of
    ``L`` channels, ``Phi(x)`` ``[B, L, L]`` fuses the latent channels per sample, and ``P`` (1 x 1,
    ``L -> O``) projects back. ``L = floor(sqrt(pool**2 * C))``. The router: average pool to
    ``pool x pool``, a linear layer to ``max(pool**2 * C, L**2) // 16`` features (at least 4), the
    official ``SEModule_small`` (a linear layer and an hsigmoid gate), then one linear layer for
    ``Phi`` and one, through an hsigmoid, for ``Lambda``. No bias anywhere, no groups, padding
    ``k // 2``: the 1 x 1 path then reads each output position's centre tap.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, pool: int = 2) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"DCD2d takes an odd kernel size, got {kernel_size}")
        C, O = in_channels, out_channels
        self.pool = pool
        self.latent = L = math.isqrt(pool * pool * C)
        squeeze = max(max(pool * pool * C, L * L) // 16, 4)
        self.conv = nn.Conv2d(C, O, kernel_size, stride, kernel_size // 2, bias=False)  # Theta_s
        self.q = nn.Conv2d(C, L, 1, stride, 0, bias=False)
        self.p = nn.Conv2d(L, O, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(L)
        self.bn2 = nn.BatchNorm1d(L)
        self.fc = nn.Linear(pool * pool * C, squeeze, bias=False)
        self.se = nn.Linear(squeeze, squeeze, bias=False)
        self.fc_phi = nn.Linear(squeeze, L * L, bias=False)
        self.fc_scale = nn.Linear(squeeze, O, bias=False)

    def router(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(Lambda [B, O], Phi [B, L, L])`` for ``x`` ``[B, C, H, W]``."""
        y = self.fc(F.adaptive_avg_pool2d(x, self.pool).flatten(1))
        y = y * _hsigmoid(self.se(y))  # SEModule_small
        phi = self.fc_phi(y).view(x.shape[0], self.latent, self.latent)
        return _hsigmoid(self.fc_scale(y)), phi

    def forward(self, x: Tensor) -> Tensor:
        """The official forward: the dynamic part runs on the activations, never as a kernel."""
        scale, phi = self.router(x)
        r = self.conv(x) * scale[:, :, None, None]
        u = self.bn1(self.q(x))  # the latent activations
        B, L, h, w = u.shape
        u = u.view(B, L, h * w)
        u = self.bn2(torch.matmul(phi, u)) + u
        return self.p(u.view(B, L, h, w)) + r


#: A layer of the family.
FamilyLayer = Union[DynamicConv2d, ODConv2d, DCD2d]


def build_layer(variant: str, C: int, O: int, k: int, K: int, seed: int = 0) -> FamilyLayer:
    """A layer of ``variant`` (one of :data:`VARIANTS`), ``C -> O`` channels, a ``k x k`` kernel with
    padding ``k // 2``, ``K`` kernels (DCD has none: ``K`` is ignored), in float64 and eval mode,
    its parameters drawn after ``torch.manual_seed(seed)`` (the global generator is left as it was).

    DCD's BatchNorms get random statistics, scales and shifts, as after training: with the fresh
    ones (mean 0, variance 1, scale 1, shift 0) they would hide a mistake in how they are folded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer: FamilyLayer
        if variant == "CondConv":
            layer = DynamicConv2d(C, O, k, padding=k // 2, num_kernels=K, routing="condconv")
        elif variant == "DyConv":
            layer = DynamicConv2d(C, O, k, padding=k // 2, num_kernels=K)
        elif variant == "ODConv":
            layer = ODConv2d(C, O, k, padding=k // 2, num_kernels=K)
        elif variant == "DCD":
            layer = DCD2d(C, O, k)
            for bn in (layer.bn1, layer.bn2):
                assert bn.running_mean is not None and bn.running_var is not None
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(bn.weight, 0.5, 1.5)
                nn.init.uniform_(bn.bias, -0.5, 0.5)
        else:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return layer.double().eval()


class Step(NamedTuple):
    """One tensor of a mixing step: what it is, its shape in symbols, its real shape (None: absent)."""

    what: str
    symbols: str
    shape: Optional[Shape]


class Mixed(NamedTuple):
    """A mixing step's result: every sample's kernel and bias, and the tensors on the way."""

    kernels: Tensor  # [B, O, C/g, k, k]
    bias: Optional[Tensor]  # [B, O]
    steps: Tuple[Step, ...]


def _shape(t: Optional[Tensor]) -> Optional[Shape]:
    return None if t is None else tuple(t.shape)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> Tuple[Tensor, Tensor]:
    """A BatchNorm in eval mode as ``scale * u + shift``, per channel."""
    assert bn.running_var is not None and bn.running_mean is not None  # built with its statistics
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - scale * bn.running_mean


def mix_kernels(variant: str, layer: FamilyLayer, x: Tensor) -> Mixed:
    """The mixing step of ``variant``: every sample's kernel ``[B, O, C/g, k, k]`` and bias ``[B, O]``
    (or None) for the batch ``x`` ``[B, C, H, W]``, with every attention, matrix and kernel on the way.

    ODConv: all four attentions go into the kernel, the channel attention onto its input axis and
    the filter attention onto its output axis (the official code multiplies ``x`` and ``y`` instead).
    DCD: its BatchNorms are folded, which needs eval mode; the 1 x 1 path ``P Phi Q^T`` lands on
    the centre tap of the ``k x k`` kernel, and the BatchNorms' shifts make a per-sample bias.
    """
    B = x.shape[0]
    steps: Tuple[Step, ...]
    if isinstance(layer, DynamicConv2d):
        pi = layer.attention(x)
        name = ("gates sigmoid(fc(pool(x)))" if layer.routing == "condconv"
                else "pi = softmax(fc2(relu(fc1(pool(x)))) / tau)")
        kernels = mix(layer.bank, pi)  # sum_j pi[b, j] Theta_j
        bias = None if layer.bias is None else pi @ layer.bias
        steps = (Step(name, "[B, K]", _shape(pi)), Step("bank Theta", "[K, O, C/g, k, k]", _shape(layer.bank)),
                 Step("kernels sum_j pi[b, j] Theta_j", "[B, O, C/g, k, k]", _shape(kernels)),
                 Step("bias pi @ bias", "[B, O]", _shape(bias)))
        return Mixed(kernels, bias, steps)
    if isinstance(layer, ODConv2d):
        channel, filter_, spatial, kernel = layer.attention(x, layer.temperature)
        K, O, Cg, kH, kW = layer.bank.shape
        g = layer.groups
        # The attentions in the shapes the official code gives them.
        a_c = channel.view(B, -1, 1, 1)
        a_f = None if filter_ is None else filter_.view(B, O, 1, 1)
        a_s = None if spatial is None else spatial.view(B, 1, 1, 1, kH, kW)
        a_w = None if kernel is None else kernel.view(B, K, 1, 1, 1, 1)
        # As the official code: [B, 1, 1, 1, k, k] * [B, K, 1, 1, 1, 1] * [1, K, O, C/g, k, k].
        scaled = layer.bank.unsqueeze(0).expand(B, -1, -1, -1, -1, -1)
        if a_s is not None:
            scaled = scaled * a_s
        if a_w is not None:
            scaled = scaled * a_w
        kernels = scaled.sum(dim=1)  # [B, O, C/g, k, k]
        # The channel attention onto the kernel's input axis: output channel o of group i reads
        # input channels i*C/g .. (i+1)*C/g - 1.
        per_filter = channel.view(B, g, 1, Cg).expand(B, g, O // g, Cg).reshape(B, O, Cg)
        kernels = kernels * per_filter[..., None, None]
        if filter_ is not None:
            kernels = kernels * filter_.view(B, O, 1, 1, 1)
        steps = (Step("spatial attention", "[B, 1, 1, 1, k, k]", _shape(a_s)),
                 Step("input channel attention", "[B, C, 1, 1]", _shape(a_c)),
                 Step("output channel attention", "[B, O, 1, 1]", _shape(a_f)),
                 Step("kernel attention", "[B, K, 1, 1, 1, 1]", _shape(a_w)),
                 Step("bank Theta", "[K, O, C/g, k, k]", _shape(layer.bank)),
                 Step("spatial * kernel * Theta" if a_w is not None else "spatial * Theta",
                      "[B, K, O, C/g, k, k]", _shape(scaled)),
                 Step("kernels, all four attentions in" if a_w is not None else "kernels, its attentions in",
                      "[B, O, C/g, k, k]", _shape(kernels)))
        return Mixed(kernels, None, steps)
    if isinstance(layer, DCD2d):
        if layer.training:
            raise ValueError("DCD2d's kernels are folded from its BatchNorms' running statistics: call .eval()")
        lam, phi = layer.router(x)  # Lambda [B, O], Phi [B, L, L]
        theta0 = layer.conv.weight  # [O, C, k, k]
        q = layer.q.weight[:, :, 0, 0]  # [L, C]
        p = layer.p.weight[:, :, 0, 0]  # [O, L]
        s1, t1 = _bn_affine(layer.bn1)
        s2, t2 = _bn_affine(layer.bn2)
        # bn2(Phi u) + u = (I + s2 Phi) u + t2, and u = s1 Q^T x + t1.
        fusion = torch.eye(layer.latent, dtype=phi.dtype) + s2[:, None] * phi  # [B, L, L]
        dynamic = p @ fusion @ (s1[:, None] * q)  # P Phi Q^T, [B, O, C]
        kernels = lam[:, :, None, None, None] * theta0  # Lambda Theta_s, [B, O, C, k, k]
        c = theta0.shape[-1] // 2
        centre = torch.zeros_like(kernels)
        centre[..., c, c] = dynamic
        kernels = kernels + centre
        bias = ((fusion @ t1) + t2) @ p.T  # [B, O]
        steps = (Step("Theta_s, the static kernel", "[O, C, k, k]", _shape(theta0)),
                 Step("Lambda(x)", "[B, O]", _shape(lam)),
                 Step("Q^T (1 x 1 convolution q)", "[L, C]", _shape(q)),
                 Step("Phi(x), with I and BatchNorm", "[B, L, L]", _shape(fusion)),
                 Step("P (1 x 1 convolution p)", "[O, L]", _shape(p)),
                 Step("P Phi(x) Q^T", "[B, O, C]", _shape(dynamic)),
                 Step("kernels Lambda Theta_s + P Phi Q^T", "[B, O, C/g, k, k]", _shape(kernels)),
                 Step("bias from the BatchNorms' shifts", "[B, O]", _shape(bias)))
        return Mixed(kernels, bias, steps)
    raise TypeError(f"not a layer of the family: {type(layer).__name__}")


def conv_arguments(layer: FamilyLayer) -> Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], int]:
    """``(stride, padding, dilation, groups)`` of the layer's convolution."""
    conv = layer.conv if isinstance(layer, DCD2d) else layer
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)  # type: ignore[arg-type]


def batch(x: Tensor, mixed: Mixed, layer: FamilyLayer) -> Tuple[Tensor, ConvCall]:
    """The batching step, the same for every variant: ``batch_as_groups_conv`` on the mixed kernels;
    the output ``[B, O, H', W']`` and the ``F.conv2d`` call it made."""
    with record_conv_calls() as calls:
        out = batch_as_groups_conv(x, mixed.kernels, mixed.bias, *conv_arguments(layer))
    return out, calls.calls[0]


def per_sample_loop(x: Tensor, mixed: Mixed, layer: FamilyLayer) -> Tensor:
    """One ordinary ``F.conv2d`` per sample with its own kernel: what the batching step must equal."""
    stride, padding, dilation, groups = conv_arguments(layer)
    outs = [F.conv2d(x[b : b + 1], mixed.kernels[b], None if mixed.bias is None else mixed.bias[b],
                     stride, padding, dilation, groups) for b in range(x.shape[0])]
    return torch.cat(outs)


@dataclass(frozen=True)
class FamilyShapes:
    """One variant on one batch: the mixing step's shapes, the batching call, and the checks."""

    variant: str
    x: Shape
    steps: Tuple[Step, ...]
    batch_call: ConvCall  # x [1, B*C, H, W], weight [B*O, C/g, k, k], groups = B*g
    output: Shape  # [B, O, H', W']
    max_difference: float  # max |batched - per-sample loop|
    matches_loop: bool
    matches_layer: bool  # the batched result equals the layer's own forward
    attention_sums: Optional[Tuple[float, ...]]  # CondConv's and DyConv's weights summed per sample
    latent: Optional[int]  # DCD's L


def family_shapes(variant: str, B: int = EXAMPLE.B, K: int = EXAMPLE.K, C: int = EXAMPLE.C, O: int = EXAMPLE.O,
                  k: int = EXAMPLE.k, H: int = EXAMPLE.H, seed: int = 0) -> FamilyShapes:
    """Mix and batch one random float64 batch ``[B, C, H, H]`` through a layer of ``variant``."""
    layer = build_layer(variant, C, O, k, K, seed)
    x = torch.randn(B, C, H, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        mixed = mix_kernels(variant, layer, x)
        out, call = batch(x, mixed, layer)
        loop = per_sample_loop(x, mixed, layer)
        own = layer(x)
        sums = None
        if isinstance(layer, DynamicConv2d):
            sums = tuple(round(float(s), 3) for s in layer.attention(x).sum(dim=1))
    return FamilyShapes(
        variant=variant, x=tuple(x.shape), steps=mixed.steps, batch_call=call, output=tuple(out.shape),
        max_difference=float((out - loop).abs().max()),
        matches_loop=bool(torch.allclose(out, loop, rtol=1e-10, atol=1e-12)),
        matches_layer=bool(torch.allclose(out, own, rtol=1e-10, atol=1e-12)),
        attention_sums=sums, latent=layer.latent if isinstance(layer, DCD2d) else None,
    )


def parameter_parts(layer: FamilyLayer) -> Dict[str, int]:
    """The layer's parameters by part: ``kernels`` (the bank, or DCD's ``Theta_s``; with the biases),
    ``P and Q`` (DCD's latent path, its BatchNorms included) and ``router``."""
    parts: Dict[str, int] = {"kernels": 0, "P and Q": 0, "router": 0}
    for name, p in layer.named_parameters():
        top = name.split(".")[0]
        if top in ("weight", "bias", "conv"):
            parts["kernels"] += p.numel()
        elif top in ("p", "q", "bn1", "bn2"):
            parts["P and Q"] += p.numel()
        else:
            parts["router"] += p.numel()
    return parts


def multiply_adds(layer: FamilyLayer, x: Tensor) -> int:
    """Multiply-adds of ``layer(x)`` as ``torch.utils.flop_counter`` counts them: convolutions and
    matrix products (half its FLOPs); it does not count element-wise products."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops() // 2

