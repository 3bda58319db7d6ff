"""``ODConv2d``: omni-dimensional dynamic convolution (Li, Zhou and Yao, ICLR 2022,
"Omni-Dimensional Dynamic Convolution", arXiv:2209.07947), with the semantics of the
official code (OSVAI/ODConv, ``modules/odconv.py``), whose checkpoints it loads.

Four attentions come from one router, average pool -> 1 x 1 convolution without bias ->
BatchNorm -> ReLU, and four heads:

- ``channel`` ``[B, C]``: a sigmoid per input channel; it multiplies the kernel's input axis,
  which is the same as multiplying the input ``x`` (the official code does the latter);
- ``filter`` ``[B, O]``: a sigmoid per output channel, on the output ``y`` (left out for a
  depthwise convolution, ``C = O = groups``);
- ``spatial`` ``[B, kH*kW]``: a sigmoid per kernel position, on the kernel (left out for a
  1 x 1 kernel);
- ``kernel`` ``[B, K]``: a softmax over the K kernels, as dynamic convolution's (left out for
  ``K = 1``).

Every head divides its logits by the temperature. Sample ``b``'s kernel is
``spatial[b] * sum_j kernel[b, j] * Theta_j``: only this mixing differs from
:class:`~dyconv_teach.layers.DynamicConv2d`; the batching step is the package's
:func:`~dyconv_teach.strategies.batch_as_groups_conv`.
"""

from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import (
    DtypeMismatchError,
    IntOrTuple,
    TensorMismatchError,
    autocast_dtype,
    check_conv_args,
    ntuple,
    positive_int,
)
from .layers import _float_under_autocast, _Tempered
from .strategies import batch_as_groups_conv, mix

__all__ = ["ODConv2d", "ODAttention"]


class ODAttention(nn.Module):
    """The router of :class:`ODConv2d`, with the official code's modules and names (so that its
    ``state_dict`` keys are the official ones): ``fc`` (1 x 1 convolution, no bias), ``bn``,
    and the heads ``channel_fc``, ``filter_fc``, ``spatial_fc``, ``kernel_fc`` (1 x 1
    convolutions with bias), each present only where its attention is used."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], groups: int, reduction: float,
        num_kernels: int, min_channels: int, factory: Dict[str, Any],
    ) -> None:
        super().__init__()
        hidden = max(int(in_channels * reduction), min_channels)
        self.fc = nn.Conv2d(in_channels, hidden, 1, bias=False, **factory)
        self.bn = nn.BatchNorm2d(hidden, **factory)
        self.channel_fc = nn.Conv2d(hidden, in_channels, 1, **factory)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Conv2d(hidden, out_channels, 1, **factory)
        taps = kernel_size[0] * kernel_size[1]
        self.spatial_fc = None if taps == 1 else nn.Conv2d(hidden, taps, 1, **factory)
        self.kernel_fc = None if num_kernels == 1 else nn.Conv2d(hidden, num_kernels, 1, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Kaiming normal (fan out, ReLU) for the 1 x 1 convolutions,
        zero biases, BatchNorm at scale 1 and shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(
        self, x: Tensor, temperature: float
    ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """``(channel [B, C], filter [B, O], spatial [B, kH*kW], kernel [B, K])`` for ``x`` ``[B, C, H, W]``;
        ``None`` for an attention the layer does not use."""
        hidden = F.relu(self.bn(self.fc(x.mean(dim=(2, 3), keepdim=True))))

        def head(fc: Optional[nn.Module], softmax: bool = False) -> Optional[Tensor]:
            if fc is None:
                return None
            logits = _float_under_autocast(fc(hidden).flatten(1)) / temperature
            return torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits)

        channel = head(self.channel_fc)
        assert channel is not None
        return channel, head(self.filter_fc), head(self.spatial_fc), head(self.kernel_fc, softmax=True)


class ODConv2d(_Tempered, nn.Module):
    r"""Omni-dimensional dynamic convolution: ``num_kernels`` kernels mixed per sample by a softmax,
    and scaled per sample along their input channels, output channels and kernel positions.

    For sample ``b`` with attentions ``channel``, ``filter``, ``spatial`` and ``kernel`` (see the
    module docstring)::

        y[b] = filter[b] * conv2d(channel[b] * x[b], spatial[b] * sum_j kernel[b, j] * Theta_j)

    as the official code computes it, with no bias (ODConv has none). ``in_channels``,
    ``out_channels``, ``kernel_size``, ``stride``, ``padding`` (zeros, numeric), ``dilation``,
    ``groups``, ``device`` and ``dtype`` are those of :class:`torch.nn.Conv2d`; the other arguments
    follow the official ``ODConv2d``.

    Args:
        reduction: the router's hidden width is ``max(int(in_channels * reduction), min_channels)``
            (the official 0.0625 and 16).
        num_kernels: ``K`` (the official ``kernel_num``, 4 in the paper's ODConv (4x)).
        min_channels: see ``reduction``.
        temperature: every head's logits are divided by it (the official code's default is 1;
            :func:`~dyconv_teach.layers.set_temperature` sets it, the official ``update_temperature``
            does there). Not saved in the ``state_dict``, whose keys are the official ones.
        strategy: ``'auto'`` or ``'batch_as_groups'`` (the batching step; ODConv's spatial attention
            makes each sample's kernel its own, so the K-branch sum does not apply).

    Attributes:
        weight: the kernels stored as ``(K*O, C/groups, kH, kW)`` (``model.to(memory_format=...)``
            treats it as a convolution weight); ``bank`` is its view ``(K, O, C/groups, kH, kW)``.
            :meth:`~torch.nn.Module.load_state_dict` also takes the official layout,
            ``weight`` ``(K, O, C/groups, kH, kW)``.
        attention: the router, :class:`ODAttention`. Its BatchNorm normalises over the batch in
            training mode: a batch of one sample then has nothing to normalise over, and the
            layer raises ``ValueError`` (the official module raises torch's); in eval mode it uses
            its running statistics.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrTuple,
        stride: IntOrTuple = 1,
        padding: IntOrTuple = 0,
        dilation: IntOrTuple = 1,
        groups: int = 1,
        reduction: float = 0.0625,
        num_kernels: int = 4,
        min_channels: int = 16,
        temperature: float = 1.0,
        strategy: str = "auto",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        factory: Dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.num_kernels = positive_int("num_kernels (K)", num_kernels)
        self.groups = positive_int("groups", groups)
        if isinstance(padding, str):
            raise ValueError(f"ODConv2d takes numeric padding, as the official code does; got {padding!r}")
        if strategy not in ("auto", "batch_as_groups"):
            raise ValueError(f"strategy must be 'auto' or 'batch_as_groups', got {strategy!r}")
        if not (isinstance(reduction, (int, float)) and reduction > 0):
            raise ValueError(f"reduction must be a positive number, got {reduction!r}")
        stride_, padding_, dilation_ = check_conv_args(
            2, self.in_channels, self.out_channels, self.groups, stride, padding, dilation
        )
        self.stride, self.padding, self.dilation = stride_, ntuple("padding", padding_, 2, 0), dilation_
        self.kernel_size: Tuple[int, int] = ntuple("kernel_size", kernel_size, 2, 1)  # type: ignore[assignment]
        self.strategy = strategy
        self.temperature = temperature
        self.attention = ODAttention(self.in_channels, self.out_channels, self.kernel_size, self.groups, reduction,
                                     self.num_kernels, positive_int("min_channels", min_channels), factory)
        self.weight = nn.Parameter(
            torch.empty(self.num_kernels * self.out_channels, self.in_channels // self.groups, *self.kernel_size,
                        **factory)
        )
        self.reset_parameters()

    @property
    def bank(self) -> Tensor:
        """The kernel bank ``Theta``, a view of :attr:`weight` shaped ``(K, O, C/groups, kH, kW)``."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    def reset_parameters(self) -> None:
        """The official initialisation: each kernel Kaiming normal (fan out, ReLU); the router's."""
        bank = self.bank.data
        for j in range(self.num_kernels):
            nn.init.kaiming_normal_(bank[j], mode="fan_out", nonlinearity="relu")
        self.attention.reset_parameters()

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict: Dict[str, Any], prefix: str, *args, **kwargs
    ) -> None:
        # The official checkpoints store the kernels 5-D, (K, O, C/groups, kH, kW).
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 5:
            state_dict[prefix + "weight"] = weight.flatten(0, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` ``[B, C, H, W]`` with each sample's kernel: ``[B, O, H', W']``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise TensorMismatchError(
                f"ODConv2d expects [B, C, H, W] input with C = in_channels = {self.in_channels}, "
                f"got shape {tuple(x.shape)}"
            )
        if x.device != self.weight.device or (x.dtype != self.weight.dtype and autocast_dtype(x.device.type) is None):
            raise DtypeMismatchError(
                f"input is {x.dtype} on {x.device} but the layer is {self.weight.dtype} on {self.weight.device}"
            )
        conv = (self.stride, self.padding, self.dilation, self.groups)
        if x.shape[0] == 0:  # nothing to attend to; an empty output, as nn.Conv2d gives
            return F.conv2d(x, self.bank[0], None, *conv)
        if self.training and x.shape[0] == 1:
            raise ValueError(
                "ODConv2d's attention normalises over the batch (BatchNorm) in training mode, and a batch "
                "of 1 sample has nothing to normalise over: train with batches of 2 or more, or call .eval()"
            )
        channel, filter_, spatial, kernel = self.attention(x, self.temperature)
        x = x * channel[:, :, None, None].to(x.dtype)
        if spatial is None and kernel is None:  # a 1 x 1 kernel and K = 1: one kernel for all samples
            y = F.conv2d(x, self.bank[0], None, *conv)
        else:
            B, bank = x.shape[0], self.bank
            kernels = mix(bank, kernel.to(bank.dtype)) if kernel is not None else bank.expand(B, *bank.shape[1:])
            if spatial is not None:
                kernels = kernels * spatial.view(B, 1, 1, *self.kernel_size).to(kernels.dtype)
            y = batch_as_groups_conv(x, kernels, None, *conv)
        return y if filter_ is None else y * filter_[:, :, None, None].to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"num_kernels={self.num_kernels}, temperature={self.temperature}")
