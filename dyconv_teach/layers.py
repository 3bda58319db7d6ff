"""``DynamicConv1d``, ``DynamicConv2d`` and ``DynamicConv3d``: drop-in ``nn.Conv1d/2d/3d``
whose kernel depends on the input.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
CVPR 2020 (arXiv:1912.03458). With ``routing='sigmoid'`` the kernels are mixed
by independent sigmoid gates as in CondConv (Yang et al., NeurIPS 2019,
arXiv:1904.04971). One private class, ``_DynamicConvNd``, holds the layer for every
number of spatial dimensions, as torch's ``_ConvNd`` does.
"""

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import (
    SPATIAL,
    IntOrTuple,
    Padding,
    autocast_dtype,
    check_conv_args,
    explicit_padding,
    input_text,
    ntuple,
    positive_int,
)
from .functional import STRATEGY_NAMES, _dynamic_conv

__all__ = [
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "set_temperature",
    "linear_temperature",
    "MIN_TEMPERATURE",
]

#: The smallest temperature the layer accepts. At tau = 1e-3 the softmax is already
#: one-hot for any logit gap above 0.02 (exp(-20) ~ 2e-9), so a smaller tau would change
#: nothing but the size of the gradients, which grow as 1/tau, and logits / tau overflows
#: to inf (then NaN) long before tau reaches 0.
MIN_TEMPERATURE = 1e-3

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _checked_temperature(value: object) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE}, got {value!r}")
    if value < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE} (below it the routing is already one-hot and "
            f"logits / temperature overflow), got {value!r}"
        )
    return float(value)


def _check_input(x: Tensor, layer: "_DynamicConvNd") -> Tensor:
    """``x`` itself, after checking it fits the layer (a separate function, so that
    ``torch.fx.symbolic_trace`` keeps it as one call instead of tracing its branches)."""
    name, dims = type(layer).__name__, layer._dims
    if x.dim() not in (dims + 1, dims + 2):
        raise ValueError(
            f"{name} expects {input_text(dims)} or {input_text(dims, batched=False)} input, got shape {tuple(x.shape)}"
        )
    if x.shape[-dims - 1] != layer.in_channels:
        raise ValueError(f"{name} expects in_channels={layer.in_channels}, got input of shape {tuple(x.shape)}")
    weight = layer.weight
    if x.device != weight.device or (x.dtype != weight.dtype and autocast_dtype(x.device.type) is None):
        raise TypeError(f"input is {x.dtype} on {x.device} but the layer is {weight.dtype} on {weight.device}")
    return x


def _float_under_autocast(logits: Tensor) -> Tensor:
    """The attention's logits in float32 under ``torch.autocast`` (as autocast runs softmax)."""
    return logits.float() if autocast_dtype(logits.device.type) is not None else logits


# torch.fx.symbolic_trace runs forward on proxies; these calls stay whole in its graph.
torch.fx.wrap("_check_input")
torch.fx.wrap("_float_under_autocast")
torch.fx.wrap("_dynamic_conv")


def _scripted_conv(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor], num_kernels: int, stride: List[int],
    padding: List[int], dilation: List[int], groups: int,
) -> Tensor:
    """Batch-as-groups as TorchScript compiles it (the layer's forward under ``torch.jit.script``):
    ``weight`` is the layer's 4-D storage ``[K*O, C/g, *kernel]``; no checks, contiguous output."""
    unbatched = x.dim() == weight.dim() - 1
    if unbatched:
        x, attention = x.unsqueeze(0), attention.unsqueeze(0)
    B, C, O = x.shape[0], x.shape[1], weight.shape[0] // num_kernels
    # TorchScript's sizes are List[int] (torch.Size for mypy): hence the ignores.
    mixed = torch.mm(attention, weight.reshape(num_kernels, -1)).reshape([B * O] + weight.shape[1:])  # type: ignore[operator]
    mixed_bias = None if bias is None else torch.mm(attention, bias).reshape(-1)
    folded = x.reshape([1, B * C] + x.shape[2:])  # type: ignore[operator]
    no_output_padding = [0 for _ in stride]
    out = torch.convolution(folded, mixed, mixed_bias, stride, padding, dilation, False, no_output_padding, B * groups)
    out = out.reshape([B, O] + out.shape[2:])  # type: ignore[operator]
    return out.squeeze(0) if unbatched else out


class _DynamicConvNd(nn.Module):
    """The layer for ``_dims`` spatial dimensions; :class:`DynamicConv2d` documents it."""

    _dims: int = 2
    __constants__ = ["in_channels", "out_channels", "num_kernels", "groups", "routing", "padding_mode"]
    __jit_unused_properties__ = ["bank"]
    last_attention: Optional[Tensor]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: Padding = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        routing: str = "softmax",
        strategy: str = "auto",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory: Dict[str, Any] = {"device": device, "dtype": dtype}
        dims = self._dims
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.num_kernels = positive_int("num_kernels (K)", num_kernels)
        self.reduction = positive_int("reduction", reduction)
        if routing not in ("softmax", "sigmoid"):
            raise ValueError(f"routing must be 'softmax' or 'sigmoid', got {routing!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.groups = positive_int("groups", groups)
        self.stride, self.padding, self.dilation = check_conv_args(
            dims, self.in_channels, self.out_channels, self.groups, stride, padding, dilation
        )
        self.kernel_size: Tuple[int, ...] = ntuple("kernel_size", kernel_size, dims, 1)
        self.padding_mode = padding_mode
        self.routing = routing
        if strategy not in STRATEGY_NAMES:
            raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {strategy!r}")
        self.strategy = strategy
        # Padding as nn.Conv2d applies it: padding modes other than zeros, and the uneven zero
        # padding of 'same' with an even kernel, pad the input first (F.pad's order: last axis
        # first); everything else is the convolution's own padding.
        before, after = explicit_padding(self.padding, self.kernel_size, self.dilation)
        self._reversed_padding_repeated_twice = [p for b, a in zip(before[::-1], after[::-1]) for p in (b, a)]
        self._prepad = padding_mode != "zeros" or before != after
        self._pad_mode = "constant" if padding_mode == "zeros" else padding_mode
        self._conv_padding: Tuple[int, ...] = (0,) * dims if self._prepad else before
        self._pool_dims = list(range(-dims, 0))
        hidden = max(self.in_channels // self.reduction, self.num_kernels)
        # The attention branch of the paper: squeeze (avgpool), excite (FC-ReLU-FC) to K logits.
        self.fc1 = nn.Linear(self.in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, self.num_kernels, **factory)
        self.weight = nn.Parameter(
            torch.empty(
                self.num_kernels * self.out_channels, self.in_channels // self.groups, *self.kernel_size, **factory
            )
        )
        self.bias = nn.Parameter(torch.empty(self.num_kernels, self.out_channels, **factory)) if bias else None
        # A buffer, not a float: annealed during training, saved in the state_dict, and read by
        # compiled, traced and scripted graphs at run time (a float would be baked into them).
        self.register_buffer("temperature", torch.tensor(_checked_temperature(temperature), **factory))
        self.last_attention = None
        self.reset_parameters()

    def __setattr__(self, name: str, value: Any) -> None:
        # layer.temperature = 5.0 checks the number and writes it into the buffer in place, so
        # every graph that holds the buffer (traced, scripted) sees the new value.
        if name == "temperature" and "temperature" in self._buffers:
            with torch.no_grad():
                self._buffers["temperature"].fill_(_checked_temperature(value))  # type: ignore[union-attr]
            return
        super().__setattr__(name, value)

    @property
    def bank(self) -> Tensor:
        """The kernel bank ``Theta`` as ``(K, O, C/groups, *kernel_size)``: a view of :attr:`weight`."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict: Dict[str, Any], prefix: str, *args, **kwargs
    ) -> None:
        # Checkpoints of dyconv_teach before 0.2 stored the bank with one more axis,
        # (K, O, C/groups, *kernel_size), and the temperature as extra state.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == self._dims + 3:
            state_dict[prefix + "weight"] = weight.flatten(0, 1)
        extra = state_dict.pop(prefix + "_extra_state", None)
        if extra is not None:
            state_dict[prefix + "temperature"] = torch.tensor(_checked_temperature(extra["temperature"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels (and biases) exactly as ``nn.Conv2d`` does."""
        fan_in = self.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        bank = self.bank.data
        for j in range(self.num_kernels):
            # kaiming_uniform_ on the whole bank would take fan_in over K*O rows; init per kernel.
            nn.init.kaiming_uniform_(bank[j], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias.data[j], -bound, bound)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def attention(self, x: Tensor) -> Tensor:
        """Attention weights ``pi``: ``[B, K]`` for a batch, ``[K]`` for an unbatched input."""
        logits = self.fc2(F.relu(self.fc1(x.mean(self._pool_dims))))
        if not torch.jit.is_scripting():
            logits = _float_under_autocast(logits)
        logits = logits / self.temperature
        if self.routing == "softmax":
            return torch.softmax(logits, dim=-1)
        return torch.sigmoid(logits)

    def forward(self, x: Tensor) -> Tensor:
        """The dynamic convolution of ``x``, as the class docstring describes."""
        if not torch.jit.is_scripting():
            return self._forward(x)
        pi = self.attention(x)
        self.last_attention = pi.detach()
        if self._prepad:
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self._pad_mode)
        return _scripted_conv(x, self.weight, pi, self.bias, self.num_kernels, [s for s in self.stride],
                              [p for p in self._conv_padding], [d for d in self.dilation], self.groups)

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self)
        pi = self.attention(x)
        if not (isinstance(pi, torch.fx.Proxy) or torch.compiler.is_exporting()):
            self.last_attention = pi.detach()
        if self._prepad:
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self._pad_mode)
        return _dynamic_conv(self._dims, x, self.bank, pi, self.bias, self.stride, self._conv_padding,
                             self.dilation, self.groups, self.strategy)

    def extra_repr(self) -> str:
        """The arguments shown by ``repr``: ``nn.Conv2d``'s, then the layer's own that are set."""
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0,) * self._dims:
            s += ", padding={padding}"
        if self.dilation != (1,) * self._dims:
            s += ", dilation={dilation}"
        if self.groups != 1:
            s += ", groups={groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += ", padding_mode={padding_mode}"
        s += ", num_kernels={num_kernels}"
        if self.reduction != 4:
            s += ", reduction={reduction}"
        s += ", temperature={tau}"
        if self.routing != "softmax":
            s += ", routing={routing}"
        if self.strategy != "auto":
            s += ", strategy={strategy}"
        return s.format(**self.__dict__, tau=float(self.temperature))  # type: ignore[arg-type]


_LAYER_DOC = r"""{dims}-D convolution with ``num_kernels`` kernels mixed per sample by attention.

    For an input ``x`` the layer computes attention weights
    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / temperature)`` of shape ``[B, K]``
    and convolves sample ``b`` with ``sum_j pi[b, j] * Theta_j`` (and bias
    ``sum_j pi[b, j] * bias[j]``). Arguments follow :class:`torch.nn.Conv{dims}d`.

    Args:
        in_channels: ``C``, channels of the input.
        out_channels: ``O``, channels of the output.
        kernel_size: an int or a tuple of {dims} ints.
        stride, padding, dilation, groups: as in :class:`torch.nn.Conv{dims}d`;
            ``padding`` may also be ``'same'`` or ``'valid'``.
        bias: if ``True``, each of the K kernels has its own bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``,
            as in :class:`torch.nn.Conv{dims}d`.
        num_kernels: ``K``, kernels in the bank (``K >= 1``).
        reduction: the attention branch's hidden width is
            ``max(in_channels // reduction, num_kernels)`` (this package's choice).
        temperature: ``tau >= MIN_TEMPERATURE`` (1e-3); logits are divided by it before the
            softmax. The paper anneals it from 30 to 1 over the first epochs; see
            :func:`linear_temperature` and :func:`set_temperature`.
        routing: ``'softmax'`` (DyConv, weights sum to 1) or ``'sigmoid'``
            (independent gates in (0, 1)).
        strategy: how the core batches the convolution: ``'auto'`` (per device and
            shape, the rule of :func:`dyconv_teach.strategies.choose`), ``'benchmark'`` (the
            fastest on this machine, timed once per shape: :func:`dyconv_teach.strategies.benchmark`)
            or a name from :data:`dyconv_teach.strategies.STRATEGIES`. Results do not depend on it.
        device, dtype: as in :class:`torch.nn.Conv{dims}d`.

    Shape:
        - Input: ``{x}`` or ``{x1}``
        - Output: ``{out}`` or the same without ``B``, in the input's memory format, where
          each output size follows the formula of :class:`torch.nn.Conv{dims}d`, e.g.

          ``{first}' = floor(({first} + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1)``

    Attributes:
        weight: the kernel bank stored as ``(K*O, C/groups, *kernel_size)``, kernel ``j`` in rows
            ``j*O .. j*O + O - 1`` (one axis fewer than the bank, so
            ``model.to(memory_format=...)`` treats it as a convolution weight); ``bank`` is its view
            ``(K, O, C/groups, *kernel_size)``.
        bias: bias bank ``(K, O)`` or ``None``.
        temperature: ``tau``, a 0-d buffer (saved in the ``state_dict``); assign a number to change it.
        last_attention: detached ``pi`` of the last forward, ``(B, K)``, or ``None``.

    Under ``torch.autocast`` the attention's softmax (or sigmoid) runs in float32 and the
    kernel mixing and convolution in the autocast dtype.
    """


def _layer_doc(dims: int) -> str:
    out = "[B, O, " + ", ".join(s + "'" for s in SPATIAL[dims]) + "]"
    return _LAYER_DOC.format(dims=dims, x=input_text(dims), x1=input_text(dims, batched=False), out=out,
                             first=SPATIAL[dims][0])


class DynamicConv1d(_DynamicConvNd):
    _dims = 1
    __doc__ = _layer_doc(1)


class DynamicConv2d(_DynamicConvNd):
    _dims = 2
    __doc__ = _layer_doc(2)


class DynamicConv3d(_DynamicConvNd):
    _dims = 3
    __doc__ = _layer_doc(3)


def linear_temperature(epoch: float, start: float = 30.0, end: float = 1.0, anneal_epochs: float = 10.0) -> float:
    """The paper's schedule: ``tau`` falls linearly from ``start`` to ``end`` over
    ``anneal_epochs`` epochs, then stays at ``end``."""
    if anneal_epochs <= 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    frac = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return start + (end - start) * frac


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set ``temperature`` on every dynamic convolution layer inside ``model``.

    Returns how many layers were set, so a caller can check it found some.
    """
    layers: List[_DynamicConvNd] = [m for m in model.modules() if isinstance(m, _DynamicConvNd)]
    for layer in layers:
        layer.temperature = temperature  # type: ignore[assignment]
    return len(layers)
