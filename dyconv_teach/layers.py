"""``DynamicConv2d``: a drop-in ``nn.Conv2d`` whose kernel depends on the input.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
CVPR 2020 (arXiv:1912.03458). With ``routing='sigmoid'`` the kernels are mixed
by independent sigmoid gates as in CondConv (Yang et al., NeurIPS 2019,
arXiv:1904.04971).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import IntPair, Padding, autocast_dtype, check_conv_args, pair, positive_int, same_padding
from .functional import STRATEGY_NAMES, dynamic_conv2d

__all__ = ["DynamicConv2d", "set_temperature", "linear_temperature", "MIN_TEMPERATURE"]

#: The smallest temperature the layer accepts. At tau = 1e-3 the softmax is already
#: one-hot for any logit gap above 0.02 (exp(-20) ~ 2e-9), so a smaller tau would change
#: nothing but the size of the gradients, which grow as 1/tau, and logits / tau overflows
#: to inf (then NaN) long before tau reaches 0.
MIN_TEMPERATURE = 1e-3

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_input(x: Tensor, in_channels: int, weight: Tensor) -> Tensor:
    """``x`` itself, after checking it fits the layer (a separate function, so that
    ``torch.fx.symbolic_trace`` keeps it as one call instead of tracing its branches)."""
    if x.dim() not in (3, 4):
        raise ValueError(f"DynamicConv2d expects [B, C, H, W] or [C, H, W] input, got shape {tuple(x.shape)}")
    if x.shape[-3] != in_channels:
        raise ValueError(f"DynamicConv2d expects in_channels={in_channels}, got input of shape {tuple(x.shape)}")
    if x.device != weight.device or (x.dtype != weight.dtype and autocast_dtype(x.device.type) is None):
        raise TypeError(f"input is {x.dtype} on {x.device} but the layer is {weight.dtype} on {weight.device}")
    return x


# torch.fx.symbolic_trace runs forward on proxies; these two calls stay whole in its graph.
torch.fx.wrap("_check_input")
torch.fx.wrap("dynamic_conv2d")


class DynamicConv2d(nn.Module):
    r"""2-D convolution with ``num_kernels`` kernels mixed per sample by attention.

    For an input ``x`` the layer computes attention weights
    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / temperature)`` of shape ``[B, K]``
    and convolves sample ``b`` with ``sum_j pi[b, j] * Theta_j`` (and bias
    ``sum_j pi[b, j] * bias[j]``). Arguments follow :class:`torch.nn.Conv2d`.

    Args:
        in_channels: ``C``, channels of the input.
        out_channels: ``O``, channels of the output.
        kernel_size: ``k`` or ``(kH, kW)``.
        stride, padding, dilation, groups: as in :class:`torch.nn.Conv2d`
            (``padding`` may be ``'same'`` or ``'valid'``).
        bias: if ``True``, each of the K kernels has its own bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``,
            as in :class:`torch.nn.Conv2d`.
        num_kernels: ``K``, kernels in the bank (``K >= 1``).
        reduction: the attention branch's hidden width is
            ``max(in_channels // reduction, num_kernels)``.
        temperature: ``tau >= MIN_TEMPERATURE`` (1e-3); logits are divided by it before the
            softmax. The paper anneals it from 30 to 1 over the first epochs; see
            :func:`linear_temperature` and :func:`set_temperature`.
        routing: ``'softmax'`` (DyConv, weights sum to 1) or ``'sigmoid'``
            (CondConv, independent gates in (0, 1)).
        strategy: how the core batches the convolution: ``'auto'`` (per device and
            shape, the rule of :func:`dyconv_teach.strategies.choose`) or a name from
            :data:`dyconv_teach.strategies.STRATEGIES`, for benchmarks. Results do not depend on it.

    Shape:
        - Input: ``(B, C, H, W)`` or ``(C, H, W)``
        - Output: ``(B, O, H', W')`` or ``(O, H', W')``, in the input's memory format, where

          ``H' = floor((H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1)``

          ``W' = floor((W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1)``

    Attributes:
        weight: the kernel bank stored as ``(K*O, C/groups, kH, kW)``, kernel ``j`` in rows
            ``j*O .. j*O + O - 1`` (4-D, so ``model.to(memory_format=torch.channels_last)``
            works); :attr:`bank` is its 5-D view ``(K, O, C/groups, kH, kW)``.
        bias: bias bank ``(K, O)`` or ``None``.
        last_attention: detached ``pi`` of the last eager forward, ``(B, K)``, or ``None``.

    Under ``torch.autocast`` the attention's softmax (or sigmoid) runs in float32 and the
    kernel mixing and convolution in the autocast dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
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
            self.in_channels, self.out_channels, self.groups, stride, padding, dilation
        )
        self.kernel_size: Tuple[int, int] = pair("kernel_size", kernel_size, 1)
        self.padding_mode = padding_mode
        self.routing = routing
        if strategy not in STRATEGY_NAMES:
            raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {strategy!r}")
        self.strategy = strategy
        self.temperature = temperature
        # (left, right, top, bottom) for F.pad, as nn.Conv2d keeps it for its padding modes.
        if isinstance(self.padding, str):
            same = self.padding == "same"
            top, bottom, left, right = same_padding(self.kernel_size, self.dilation) if same else (0, 0, 0, 0)
        else:
            (top, left), (bottom, right) = self.padding, self.padding
        self._reversed_padding_repeated_twice = [left, right, top, bottom]
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
        self.last_attention: Optional[Tensor] = None
        self.reset_parameters()

    @property
    def bank(self) -> Tensor:
        """The kernel bank ``Theta`` as ``(K, O, C/groups, kH, kW)``: a view of :attr:`weight`."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    @property
    def temperature(self) -> float:
        """Softmax/sigmoid temperature ``tau``; must stay >= :data:`~dyconv_teach.layers.MIN_TEMPERATURE`."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or math.isinf(value):
            raise ValueError(f"temperature must be a finite number >= {MIN_TEMPERATURE}, got {value!r}")
        if value < MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be >= {MIN_TEMPERATURE} (below it the routing is already one-hot and "
                f"logits / temperature overflow), got {value!r}"
            )
        self._temperature = float(value)

    def get_extra_state(self) -> Dict[str, float]:
        """Save ``temperature`` in the ``state_dict``: it is annealed during training,
        so a checkpoint loaded into a fresh layer must bring it back."""
        return {"temperature": self.temperature}

    def set_extra_state(self, state: Dict[str, float]) -> None:
        """Restore the ``temperature`` saved by :meth:`get_extra_state`."""
        self.temperature = state["temperature"]

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict: Dict[str, Any], prefix: str, *args, **kwargs
    ) -> None:
        # Checkpoints of dyconv_teach 0.1 stored the bank 5-D, (K, O, C/groups, kH, kW).
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 5:
            state_dict[prefix + "weight"] = weight.flatten(0, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels (and biases) exactly as ``nn.Conv2d`` does."""
        fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
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
        """Attention weights ``pi``: ``[B, K]`` for ``x`` ``[B, C, H, W]``, ``[K]`` for ``[C, H, W]``."""
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(-2, -1)))))
        if not isinstance(logits, torch.fx.Proxy) and autocast_dtype(logits.device.type) is not None:
            logits = logits.float()  # as autocast runs softmax: in float32
        logits = logits / self.temperature
        return torch.softmax(logits, dim=-1) if self.routing == "softmax" else torch.sigmoid(logits)

    def forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self.in_channels, self.weight)
        pi = self.attention(x)
        if not (isinstance(pi, torch.fx.Proxy) or torch.compiler.is_exporting()):
            self.last_attention = pi.detach()
        padding: Padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return dynamic_conv2d(
            x, self.bank, pi, self.bias, self.stride, padding, self.dilation, self.groups, strategy=self.strategy
        )

    def extra_repr(self) -> str:
        s = "{in_channels}, {out_channels}, kernel_size={kernel_size}, stride={stride}"
        if self.padding != (0, 0):
            s += ", padding={padding}"
        if self.dilation != (1, 1):
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
        s += ", temperature={temperature}"
        if self.routing != "softmax":
            s += ", routing={routing}"
        if self.strategy != "auto":
            s += ", strategy={strategy}"
        return s.format(**self.__dict__, temperature=self.temperature)


def linear_temperature(epoch: float, start: float = 30.0, end: float = 1.0, anneal_epochs: float = 10.0) -> float:
    """The paper's schedule: ``tau`` falls linearly from ``start`` to ``end`` over
    ``anneal_epochs`` epochs, then stays at ``end``."""
    if anneal_epochs <= 0:
        raise ValueError(f"anneal_epochs must be > 0, got {anneal_epochs!r}")
    frac = min(max(epoch / anneal_epochs, 0.0), 1.0)
    return start + (end - start) * frac


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set ``temperature`` on every :class:`DynamicConv2d` inside ``model``.

    Returns how many layers were set, so a caller can check it found some.
    """
    layers: List[DynamicConv2d] = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    for layer in layers:
        layer.temperature = temperature
    return len(layers)
