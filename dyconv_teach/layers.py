"""``DynamicConv2d``: a drop-in ``nn.Conv2d`` whose kernel depends on the input.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
CVPR 2020 (arXiv:1912.03458). With ``routing='sigmoid'`` the kernels are mixed
by independent sigmoid gates as in CondConv (Yang et al., NeurIPS 2019,
arXiv:1904.04971).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .functional import IntPair, Padding, _check_positive_int, _pair_arg, check_conv_args, dynamic_conv2d

__all__ = ["DynamicConv2d", "set_temperature", "linear_temperature"]


class DynamicConv2d(nn.Module):
    r"""2-D convolution with ``num_kernels`` kernels mixed per sample by attention.

    For an input ``x`` the layer computes attention weights
    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / temperature)`` of shape
    ``[B, K]`` and convolves sample ``b`` with ``sum_k pi[b, k] * weight[k]``
    (and bias ``sum_k pi[b, k] * bias[k]``). Arguments follow
    :class:`torch.nn.Conv2d`.

    Args:
        in_channels: ``C``, channels of the input.
        out_channels: ``O``, channels of the output.
        kernel_size: ``k`` or ``(kH, kW)``.
        stride, padding, dilation, groups: as in :class:`torch.nn.Conv2d`
            (``padding`` may be ``'same'`` or ``'valid'``).
        bias: if ``True``, each of the K kernels has its own bias.
        num_kernels: ``K``, kernels in the bank (``K >= 1``).
        reduction: the attention branch's hidden width is
            ``max(in_channels // reduction, num_kernels)``.
        temperature: ``tau > 0``; logits are divided by it before the softmax.
            The paper anneals it from 30 to 1 over the first epochs; see
            :func:`linear_temperature` and :func:`set_temperature`.
        routing: ``'softmax'`` (DyConv, weights sum to 1) or ``'sigmoid'``
            (CondConv, independent gates in (0, 1)).

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, O, H', W')`` where

          ``H' = floor((H + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) / stride[0] + 1)``

          ``W' = floor((W + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) / stride[1] + 1)``

    Attributes:
        weight: kernel bank ``(K, O, C/groups, kH, kW)``.
        bias: bias bank ``(K, O)`` or ``None``.
        last_attention: detached ``pi`` of the last forward, ``(B, K)``, or ``None``.
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
        num_kernels: int = 4,
        reduction: int = 4,
        temperature: float = 30.0,
        routing: str = "softmax",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("out_channels", out_channels)
        _check_positive_int("num_kernels (K)", num_kernels)
        _check_positive_int("reduction", reduction)
        if routing not in ("softmax", "sigmoid"):
            raise ValueError(f"routing must be 'softmax' or 'sigmoid', got {routing!r}")
        self.stride, self.padding, self.dilation = check_conv_args(
            in_channels, out_channels, groups, stride, padding, dilation
        )
        self.kernel_size: Tuple[int, int] = _pair_arg("kernel_size", kernel_size, 1)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.num_kernels = num_kernels
        self.reduction = reduction
        self.routing = routing
        self.temperature = temperature
        hidden = max(in_channels // reduction, num_kernels)
        # The attention branch of the paper: squeeze (avgpool), excite (FC-ReLU-FC) to K logits.
        self.fc1 = nn.Linear(in_channels, hidden, **factory)
        self.fc2 = nn.Linear(hidden, num_kernels, **factory)
        self.weight = nn.Parameter(
            torch.empty(num_kernels, out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory)) if bias else None
        self.last_attention: Optional[Tensor] = None
        self.reset_parameters()

    @property
    def temperature(self) -> float:
        """Softmax/sigmoid temperature ``tau``; must stay > 0."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or math.isinf(value):
            raise ValueError(f"temperature must be a finite number > 0, got {value!r}")
        self._temperature = float(value)

    def get_extra_state(self) -> dict[str, float]:
        """Save ``temperature`` in the ``state_dict``: it is annealed during training,
        so a checkpoint loaded into a fresh layer must bring it back."""
        return {"temperature": self.temperature}

    def set_extra_state(self, state: dict[str, float]) -> None:
        """Restore the ``temperature`` saved by :meth:`get_extra_state`."""
        self.temperature = state["temperature"]

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels (and biases) exactly as ``nn.Conv2d`` does."""
        fan_in = self.weight.shape[2] * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        for k in range(self.num_kernels):
            # kaiming_uniform_ on the 5-D bank would take fan_in over O as well; init per kernel.
            nn.init.kaiming_uniform_(self.weight.data[k], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias.data[k], -bound, bound)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def attention(self, x: Tensor) -> Tensor:
        """Attention weights ``pi`` ``[B, K]`` for input ``x`` ``[B, C, H, W]``."""
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))) / self.temperature
        return torch.softmax(logits, dim=1) if self.routing == "softmax" else torch.sigmoid(logits)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"DynamicConv2d expects 4-D input [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"DynamicConv2d expects in_channels={self.in_channels}, got input of shape {tuple(x.shape)}"
            )
        if x.dtype != self.weight.dtype or x.device != self.weight.device:
            raise TypeError(
                f"input is {x.dtype} on {x.device} but the layer is {self.weight.dtype} on {self.weight.device}"
            )
        pi = self.attention(x)
        self.last_attention = pi.detach()
        return dynamic_conv2d(x, self.weight, pi, self.bias, self.stride, self.padding, self.dilation, self.groups)

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
        s += ", num_kernels={num_kernels}"
        if self.reduction != 4:
            s += ", reduction={reduction}"
        s += ", temperature={temperature}"
        if self.routing != "softmax":
            s += ", routing={routing}"
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
    layers = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    for layer in layers:
        layer.temperature = temperature
    return len(layers)
