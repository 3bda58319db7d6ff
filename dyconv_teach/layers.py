"""``DynamicConv1d``, ``DynamicConv2d`` and ``DynamicConv3d``: drop-in ``nn.Conv1d/2d/3d``
whose kernel depends on the input.

Chen et al., "Dynamic Convolution: Attention over Convolution Kernels",
CVPR 2020 (arXiv:1912.03458). With ``routing='condconv'`` the attention is CondConv's
router instead (Yang et al., NeurIPS 2019, arXiv:1904.04971): one linear layer and independent
sigmoid gates, no temperature; ``routing='sigmoid'`` keeps the paper's branch and temperature
and only replaces the softmax by sigmoid gates. One private class, ``_DynamicConvNd``, holds the layer for every
number of spatial dimensions, as torch's ``_ConvNd`` does.
"""

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._utils import (
    SPATIAL,
    DtypeMismatchError,
    IntOrTuple,
    Padding,
    TensorMismatchError,
    autocast_dtype,
    check_conv_args,
    explicit_padding,
    input_text,
    ntuple,
    positive_int,
)
from .functional import STRATEGY_NAMES, _dynamic_conv
from .strategies import batch_as_groups_script

__all__ = [
    "DynamicConv1d",
    "DynamicConv2d",
    "DynamicConv3d",
    "set_temperature",
    "linear_temperature",
    "MIN_TEMPERATURE",
    "ROUTINGS",
]

#: The smallest temperature the layer accepts. At tau = 1e-3 the softmax is already
#: one-hot for any logit gap above 0.02 (exp(-20) ~ 2e-9), so a smaller tau would change
#: nothing but the size of the gradients, which grow as 1/tau, and logits / tau overflows
#: to inf (then NaN) long before tau reaches 0.
MIN_TEMPERATURE = 1e-3

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: The routings the attention offers. ``softmax`` is the paper's; ``sigmoid`` puts sigmoid gates on
#: the paper's branch; ``condconv`` is CondConv's router (one linear layer, sigmoid, no temperature).
ROUTINGS = ("softmax", "sigmoid", "condconv")


def _checked_temperature(value: object) -> float:
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
        raise TensorMismatchError(
            f"{name} expects {input_text(dims)} or {input_text(dims, batched=False)} input, got shape {tuple(x.shape)}"
        )
    if x.shape[-dims - 1] != layer.in_channels:
        raise TensorMismatchError(
            f"{name} expects in_channels={layer.in_channels}, got input of shape {tuple(x.shape)}"
        )
    weight = layer.weight
    if x.device != weight.device or (x.dtype != weight.dtype and autocast_dtype(x.device.type) is None):
        raise DtypeMismatchError(f"input is {x.dtype} on {x.device} but the layer is {weight.dtype} on {weight.device}")
    return x


def _float_under_autocast(logits: Tensor) -> Tensor:
    """The attention's logits in float32 under ``torch.autocast`` (as autocast runs softmax)."""
    return logits.float() if autocast_dtype(logits.device.type) is not None else logits


def _transformed(t: Tensor) -> bool:
    """Whether ``t`` belongs to a ``torch.func`` transform (``vmap``, ``grad``): such a tensor must not
    outlive the transform (a layer keeping it could no longer be copied). torch has no public test
    for it; this is the one its own code uses (not inside ``torch.compile``, which cannot trace it)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t)


# torch.fx.symbolic_trace runs forward on proxies; these calls stay whole in its graph.
torch.fx.wrap("_check_input")
torch.fx.wrap("_float_under_autocast")
torch.fx.wrap("_dynamic_conv")


class _Tempered:
    """A layer whose attention divides its logits by a temperature: the number, checked, and the
    handle by which :func:`set_temperature` finds the layer."""

    _temperature: float

    @property
    def temperature(self) -> float:
        """Softmax/sigmoid temperature ``tau``; must stay >= :data:`~dyconv_teach.layers.MIN_TEMPERATURE`."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _checked_temperature(value)


class _DynamicConvNd(_Tempered, nn.Module):
    """The layer for ``_dims`` spatial dimensions; :class:`DynamicConv2d` documents it."""

    _dims: int = 2
    __constants__ = ["_dims", "in_channels", "out_channels", "num_kernels", "groups", "routing", "padding_mode"]
    __jit_unused_properties__ = ["bank", "temperature"]
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
        temperature: float = 1.0,
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
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
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
        # The attention branch of the paper: squeeze (avgpool), excite (FC-ReLU-FC) to K logits; or
        # CondConv's router: avgpool, one linear layer to K logits.
        condconv = routing == "condconv"
        self.fc1 = nn.Linear(self.in_channels, self.num_kernels if condconv else hidden, **factory)
        self.fc2 = nn.Identity() if condconv else nn.Linear(hidden, self.num_kernels, **factory)
        self.weight = nn.Parameter(
            torch.empty(
                self.num_kernels * self.out_channels, self.in_channels // self.groups, *self.kernel_size, **factory
            )
        )
        self.bias = nn.Parameter(torch.empty(self.num_kernels, self.out_channels, **factory)) if bias else None
        self.temperature = temperature
        self.last_attention = None
        self.reset_parameters()

    @property
    def bank(self) -> Tensor:
        """The kernel bank ``Theta``, a view of :attr:`weight` shaped ``(K, O, C/groups, *kernel_size)``."""
        return self.weight.unflatten(0, (self.num_kernels, self.out_channels))

    def get_extra_state(self) -> Tensor:
        """Save ``temperature`` in the ``state_dict`` (a 0-d float64 tensor, which exporters and
        FLOP counters that read the state_dict take as they take any tensor): it is annealed during
        training, so a checkpoint loaded into a fresh layer must bring it back."""
        return torch.tensor(self.temperature, dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        """Restore the ``temperature`` saved by :meth:`get_extra_state` (or, from checkpoints of
        dyconv_teach before 0.2, the dict ``{"temperature": tau}``)."""
        self.temperature = state["temperature"] if isinstance(state, dict) else float(state)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict: Dict[str, Any], prefix: str, *args, **kwargs
    ) -> None:
        # Checkpoints of dyconv_teach before 0.2 stored the bank with one more axis,
        # (K, O, C/groups, *kernel_size).
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == self._dims + 3:
            state_dict[prefix + "weight"] = weight.flatten(0, 1)
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
        for fc in (self.fc1, self.fc2):
            if isinstance(fc, nn.Linear):  # fc2 is the identity under CondConv's routing
                fc.reset_parameters()

    def attention(self, x: Tensor) -> Tensor:
        """Attention weights ``pi``: ``[B, K]`` for a batch, ``[K]`` for an unbatched input."""
        logits = self.fc1(x.mean(self._pool_dims))
        if self.routing != "condconv":
            logits = self.fc2(F.relu(logits))
        if not torch.jit.is_scripting():
            logits = _float_under_autocast(logits)
        if self.routing == "condconv":
            return torch.sigmoid(logits)
        logits = logits / self._temperature
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
        unbatched = x.dim() == self._dims + 1
        if unbatched:
            x, pi = x.unsqueeze(0), pi.unsqueeze(0)
        bank = self.weight.reshape([self.num_kernels, self.out_channels] + self.weight.shape[1:])  # type: ignore[operator]
        out = batch_as_groups_script(x, bank, pi, self.bias, [s for s in self.stride], [p for p in self._conv_padding],
                                     [d for d in self.dilation], self.groups)
        return out.squeeze(0) if unbatched else out

    @torch.jit.unused
    def _forward(self, x: Tensor) -> Tensor:
        x = _check_input(x, self)
        pi = self.attention(x)
        if not (isinstance(pi, torch.fx.Proxy) or torch.compiler.is_exporting() or _transformed(pi)):
            self.last_attention = pi.detach()
        if self._prepad:
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self._pad_mode)
        return _dynamic_conv(self._dims, x, self.bank, pi, self.bias, self.stride, self._conv_padding,
                             self.dilation, self.groups, self.strategy)

    def extra_repr(self) -> str:
        """The arguments shown by ``repr``: ``nn.Conv2d``'s, then ``num_kernels`` and ``temperature`` always and
        the layer's other arguments where they differ from their defaults."""
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
        return s.format(**self.__dict__, tau=self.temperature)


_LAYER_DOC = r"""{dims}-D convolution with ``num_kernels`` kernels mixed per sample by attention.

    For an input ``x`` the layer computes attention weights
    ``pi = softmax(fc2(relu(fc1(avgpool(x)))) / temperature)`` of shape ``[B, K]`` (see ``routing``)
    and convolves sample ``b`` with ``sum_j pi[b, j] * Theta_j`` (and bias
    ``sum_j pi[b, j] * bias[j]``). Arguments follow :class:`torch.nn.Conv{dims}d`.

    Args:
        in_channels: ``C``, channels of the input.
        out_channels: ``O``, channels of the output.
        kernel_size: an int or a tuple of {ints}.
        stride: step of the kernel over the input, an int or a tuple of {ints}.
        padding: added to both sides of each spatial axis (zeros, or as ``padding_mode`` says): an int,
            a tuple of {ints}, ``'same'`` (the output as large as the input; stride 1 only) or
            ``'valid'`` (no padding).
        dilation: spacing between the kernel's taps, an int or a tuple of {ints}.
        groups: ``g``; each filter reads ``C/g`` input channels (``C`` and ``O`` divisible by ``g``).
        bias: if ``True``, each of the K kernels has its own bias.
        padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``,
            as in :class:`torch.nn.Conv{dims}d`.
        num_kernels: ``K``, kernels in the bank (``K >= 1``).
        reduction: the attention branch's hidden width is
            ``max(in_channels // reduction, num_kernels)``, this package's choice (not taken from the paper).
        temperature: ``tau >= MIN_TEMPERATURE`` (1e-3); the logits are divided by it before the
            softmax or sigmoid. Default 1, the paper's value after annealing: Chen et al. start
            at 30 (nearly uniform attention, so that every kernel learns early) and lower it
            linearly to 1 over the first 10 epochs, which
            ``set_temperature(model, linear_temperature(epoch))`` at the start of each epoch does.
            A model that never anneals trains at the default.
        routing: ``'softmax'`` (DyConv, weights sum to 1); ``'sigmoid'`` (the same branch with
            independent gates in (0, 1), divided by the temperature too, so that one schedule
            anneals both); or ``'condconv'``, CondConv's router: ``sigmoid(fc1(avgpool(x)))`` with one
            linear layer ``fc1`` from C to K (``fc2`` is the identity), no hidden layer and no
            temperature (the temperature is ignored).
        strategy: how the core batches the convolution: ``'auto'`` (per device and
            shape, the rule of :func:`dyconv_teach.strategies.choose`), ``'benchmark'`` (the
            fastest on this machine, timed once per shape: :func:`dyconv_teach.strategies.benchmark`)
            or a name from :data:`dyconv_teach.strategies.STRATEGIES`. Results do not depend on it.
        device: where the parameters are created (``None``: torch's default device).
        dtype: floating-point dtype of the parameters (``None``: torch's default dtype).

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
        last_attention: detached ``pi`` of the last forward, ``(B, K)``, or ``None``.

    Under ``torch.autocast`` the attention's softmax (or sigmoid) runs in float32 and the
    kernel mixing and convolution in the autocast dtype.

    Initialisation: each of the K kernels (and biases) is initialised as ``nn.Conv{dims}d``
    initialises its one. Their mix, with weights summing to 1, is smaller: at uniform attention,
    the mean of K independent kernels has ``1/sqrt(K)`` of one kernel's spread (half at K = 4), and
    so has the output. A normalisation after the layer, as in the paper's networks, absorbs it.

    NaN: the attention pools the whole input of a sample, so one NaN or infinity anywhere in a
    sample makes that sample's whole output NaN (``nn.Conv{dims}d`` spoils only the outputs whose
    receptive field holds it); the other samples are not touched.

    ``last_attention`` is written by every forward (not under ``torch.export``, fx tracing or a
    ``torch.func`` transform):
    with several threads running one layer, it holds whichever forward wrote last. Call
    ``layer.attention(x)`` for the attention of a given call.
    """


def _layer_doc(dims: int) -> str:
    out = "[B, O, " + ", ".join(s + "'" for s in SPATIAL[dims]) + "]"
    return _LAYER_DOC.format(dims=dims, x=input_text(dims), x1=input_text(dims, batched=False), out=out,
                             first=SPATIAL[dims][0], ints="one int" if dims == 1 else f"{dims} ints")


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
    """Set ``temperature`` on every dynamic convolution layer inside ``model`` (``DynamicConv1d/2d/3d``,
    ``ODConv2d``), also in a model compiled by ``torch.jit.script`` (whose layers hold a copy of
    their temperature).

    Returns how many layers were set, so a caller can check it found some.
    """
    value = _checked_temperature(temperature)
    names = {"DynamicConv1d", "DynamicConv2d", "DynamicConv3d", "ODConv2d"}
    layers = [m for m in model.modules() if isinstance(m, _Tempered)
              or (isinstance(m, torch.jit.ScriptModule) and m.original_name in names)]
    for layer in layers:
        layer._temperature = value
    return len(layers)
