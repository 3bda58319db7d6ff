"""Tests of :mod:`dyconv_teach.layers`: the attention branch and its temperature,
the layers (1-D, 2-D, 3-D) against the slow reference, initialisation, state_dict, repr and errors."""

from __future__ import annotations

import io
import math
import random
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach.layers import (
    MIN_TEMPERATURE,
    DynamicConv1d,
    DynamicConv2d,
    DynamicConv3d,
    linear_temperature,
    set_temperature,
)
from dyconv_teach.reference import per_sample_conv


def make_layer(seed: int = 0, **kwargs: Any) -> DynamicConv2d:
    """A seeded ``DynamicConv2d(4, 6, 3, groups=2)``; ``kwargs`` override any argument."""
    torch.manual_seed(seed)
    args: dict[str, Any] = {"in_channels": 4, "out_channels": 6, "kernel_size": 3, "groups": 2, **kwargs}
    return DynamicConv2d(**args)


def randn(*shape: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> Tensor:
    """A seeded standard normal tensor, independent of the global RNG."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def entropy(p: Tensor) -> Tensor:
    """Entropy of each row of ``p`` [B, K]."""
    return -(p * p.log()).sum(dim=1)


def test_softmax_attention_is_a_distribution() -> None:
    layer = make_layer(temperature=1.0)
    pi = layer.attention(randn(5, 4, 6, 6))
    assert pi.shape == (5, 4)
    assert ((pi > 0) & (pi < 1)).all()
    torch.testing.assert_close(pi.sum(dim=1), torch.ones(5))


def test_higher_temperature_flattens_softmax_attention() -> None:
    layer = make_layer(dtype=torch.float64)
    x = randn(5, 4, 6, 6, dtype=torch.float64)
    attentions = []
    for tau in [0.5, 1.0, 2.0, 5.0, 30.0]:
        layer.temperature = tau
        attentions.append(layer.attention(x))
    for sharper, flatter in zip(attentions, attentions[1:]):
        assert (entropy(flatter) > entropy(sharper)).all()
        assert (flatter.max(dim=1).values < sharper.max(dim=1).values).all()
    assert (entropy(attentions[-1]) < math.log(4)).all()  # never quite uniform


def test_sigmoid_attention_gates_are_independent() -> None:
    layer = make_layer(routing="sigmoid", temperature=1.0, dtype=torch.float64)
    x = randn(5, 4, 6, 6, dtype=torch.float64)
    pi = layer.attention(x)
    assert ((pi > 0) & (pi < 1)).all()
    assert not torch.allclose(pi.sum(dim=1), torch.ones(5, dtype=torch.float64))
    layer.temperature = 10.0
    assert ((layer.attention(x) - 0.5).abs() < (pi - 0.5).abs()).all()  # a higher tau pulls gates to 1/2


def test_last_attention_is_recorded_detached_and_silently(capsys: pytest.CaptureFixture[str]) -> None:
    layer = make_layer()
    assert layer.last_attention is None
    x = randn(3, 4, 6, 6)
    layer(x)
    assert layer.last_attention is not None
    assert layer.last_attention.shape == (3, 4)
    assert not layer.last_attention.requires_grad and layer.last_attention.grad_fn is None
    torch.testing.assert_close(layer.last_attention, layer.attention(x).detach())
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), True, "2", None])
def test_temperature_setter_rejects_non_numbers(bad: Any) -> None:
    layer = make_layer(temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0.001, got "):
        layer.temperature = bad
    assert layer.temperature == 2.0


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, 1e-40, 9e-4])
def test_temperature_has_a_floor(bad: float) -> None:
    """Below MIN_TEMPERATURE logits / tau overflow into NaN outputs; the setter says so instead."""
    layer = make_layer(temperature=2.0)
    with pytest.raises(ValueError, match=r"temperature must be >= 0.001 \(below it the routing is already one-hot"):
        layer.temperature = bad
    layer.temperature = MIN_TEMPERATURE
    x = randn(3, 4, 6, 6) * 1e3
    assert torch.isfinite(layer(x)).all() and torch.isfinite(layer.last_attention).all()


def test_set_temperature_sets_every_layer_and_counts_them() -> None:
    model = nn.Sequential(make_layer(), nn.ReLU(), nn.Sequential(make_layer(in_channels=6)), nn.Conv2d(6, 2, 1))
    assert set_temperature(model, 5) == 2
    assert [m.temperature for m in model.modules() if isinstance(m, DynamicConv2d)] == [5.0, 5.0]
    assert set_temperature(nn.Conv2d(3, 3, 3), 5.0) == 0
    with pytest.raises(ValueError, match=r"got 0"):
        set_temperature(model, 0)


def test_linear_temperature_schedule() -> None:
    assert linear_temperature(0) == 30.0
    assert linear_temperature(10) == 1.0
    assert linear_temperature(25) == 1.0
    assert linear_temperature(-3) == 30.0
    steps = [linear_temperature(e) for e in range(11)]
    for a, b in zip(steps, steps[1:]):
        assert b - a == pytest.approx(-2.9)
    assert linear_temperature(2.5, start=10.0, end=2.0, anneal_epochs=5) == pytest.approx(6.0)
    with pytest.raises(ValueError, match=r"anneal_epochs must be > 0, got 0"):
        linear_temperature(1, anneal_epochs=0)


LAYER_CONFIGS = [
    {},
    {"bias": False, "num_kernels": 1},
    {"stride": 2, "padding": 1, "temperature": 1.0},
    {"kernel_size": (3, 1), "padding": "same", "dilation": 2, "routing": "sigmoid"},
    {"groups": 4, "out_channels": 8, "stride": (2, 1), "padding": (0, 1), "reduction": 1},
    {"kernel_size": (2, 3), "padding": "same", "padding_mode": "reflect"},
]


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=[str(c) for c in LAYER_CONFIGS])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_matches_per_sample_reference(config: dict[str, Any], channels_last: bool) -> None:
    layer = make_layer(**config)
    x = randn(3, 4, 7, 7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = layer(x)
    padding = layer.padding
    if layer.padding_mode != "zeros":  # as nn.Conv2d: pad in that mode, then convolve unpadded
        x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
    conv = {"stride": layer.stride, "padding": padding, "dilation": layer.dilation, "groups": layer.groups}
    expected = per_sample_conv(x, layer.bank, layer.last_attention, layer.bias, **conv)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


LAYERS = {1: DynamicConv1d, 2: DynamicConv2d, 3: DynamicConv3d}


def random_layer_configs(n: int, seed: int) -> list[tuple[int, dict[str, Any], int]]:
    """(dims, constructor arguments, batch) for ``n`` random layers, cycling through 1, 2 and 3-D."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        dims = (1, 2, 3)[i % 3]
        groups = rng.choice([1, 2])
        kernel = tuple(rng.randint(1, 3) for _ in range(dims))
        padding = rng.choice([0, 1, "same", tuple(rng.randint(0, 2) for _ in range(dims))])
        config: dict[str, Any] = {
            "in_channels": 2 * groups * rng.randint(1, 2), "out_channels": 2 * groups * rng.randint(1, 2),
            "kernel_size": kernel, "groups": groups, "padding": padding,
            "stride": 1 if padding == "same" else rng.choice([1, 2]), "dilation": rng.choice([1, 2]),
            "bias": rng.random() < 0.7, "num_kernels": rng.choice([1, 2, 4]),
            "padding_mode": rng.choice(["zeros", "zeros", "reflect", "circular"]),
            "routing": rng.choice(["softmax", "sigmoid"]), "temperature": rng.choice([1.0, 4.0]),
        }
        configs.append((dims, config, rng.choice([1, 3, 5])))
    return configs


LAYER_CASES = random_layer_configs(18, seed=17)


@pytest.mark.parametrize("dims, config, B", LAYER_CASES, ids=[f"{d}d-{c}-B{b}" for d, c, b in LAYER_CASES])
def test_layers_equal_a_per_sample_loop_forward_and_backward(dims: int, config: dict[str, Any], B: int) -> None:
    """Every layer, 1-D, 2-D and 3-D, equals a loop of ``F.conv1d/2d/3d`` over the samples, each with
    the kernel its attention mixes; so do the gradients of the input and of every parameter (the
    bank, the biases and the attention branch's two linear layers), in float64."""
    torch.manual_seed(0)
    layer = LAYERS[dims](**config, dtype=torch.float64)
    x = randn(B, config["in_channels"], *(7,) * dims, dtype=torch.float64).requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    padded, padding = x, layer.padding
    if layer.padding_mode != "zeros" or layer.padding == "same":  # pad as nn.Conv2d does, then convolve
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        padded, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode), 0
    conv = {"stride": layer.stride, "padding": padding, "dilation": layer.dilation, "groups": layer.groups}
    expected = per_sample_conv(padded, layer.bank, layer.attention(x), layer.bias, **conv)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(["x", *(n for n, _ in layer.named_parameters())], grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_layers_store_their_bank_like_the_2d_one(dims: int) -> None:
    layer = LAYERS[dims](4, 6, 3, groups=2, num_kernels=3)
    assert layer.weight.shape == (3 * 6, 2, *(3,) * dims) and layer.bank.shape == (3, 6, 2, *(3,) * dims)
    assert layer.kernel_size == (3,) * dims and layer.stride == (1,) * dims
    conv = getattr(nn, f"Conv{dims}d")(4, 6, 3, groups=2)
    assert layer.extra_repr() == conv.extra_repr() + ", num_kernels=3, temperature=1.0"
    with pytest.raises(ValueError, match=rf"DynamicConv{dims}d expects in_channels=4"):
        layer(randn(2, 5, *(6,) * dims))
    with pytest.raises(ValueError, match=rf"DynamicConv{dims}d expects \[B, C"):
        layer(randn(*(6,) * (dims + 3)))


def test_bank_is_a_5d_view_of_the_4d_weight() -> None:
    layer = make_layer(num_kernels=3)
    assert layer.weight.shape == (3 * 6, 2, 3, 3) and layer.bank.shape == (3, 6, 2, 3, 3)
    assert layer.bank.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(layer.bank[1], layer.weight[6:12])  # kernel j owns rows j*O .. j*O + O - 1


def test_state_dict_round_trip_keeps_outputs_and_temperature() -> None:
    layer = make_layer(seed=0)
    layer.temperature = 2.5  # as after some epochs of annealing
    x = randn(3, 4, 6, 6)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_layer(seed=1)
    assert not torch.allclose(fresh(x), layer(x))
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.temperature == 2.5
    assert torch.equal(fresh(x), layer(x))


def test_loads_a_checkpoint_of_the_first_release() -> None:
    """dyconv_teach 0.1 saved the bank as ``weight`` [K, O, C/g, kH, kW] and the temperature as
    the extra state ``{"temperature": tau}``; such checkpoints still load, temperature included."""
    layer = make_layer(seed=0)
    layer.temperature = 2.5
    old = {**layer.state_dict(), "weight": layer.bank.detach().clone(), "_extra_state": {"temperature": 2.5}}
    assert old["weight"].dim() == 5
    fresh = make_layer(seed=1)
    fresh.load_state_dict(old)
    assert fresh.temperature == 2.5
    x = randn(3, 4, 6, 6)
    assert torch.equal(fresh(x), layer(x))


def test_temperature_is_saved_as_a_tensor() -> None:
    """The state_dict holds the temperature as a 0-d float64 tensor (tools that read a state_dict,
    such as the ONNX exporter and fvcore, expect tensors there), exactly; and the layer has no buffer
    (opacus refuses a trainable layer with buffers)."""
    layer = make_layer(temperature=27.1)
    saved = layer.state_dict()["_extra_state"]
    assert isinstance(saved, Tensor) and saved.shape == () and saved.dtype == torch.float64
    fresh = make_layer(temperature=1.0)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.temperature == 27.1 and list(layer.buffers()) == []


@pytest.mark.parametrize("groups", [1, 2])
def test_each_kernel_is_initialised_like_conv2d(groups: int) -> None:
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 16, 3, groups=groups, num_kernels=4)
    conv = nn.Conv2d(8, 16, 3, groups=groups)
    # kaiming_uniform_(a=sqrt(5)) draws from U(-b, b) with b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
    bound = 1 / math.sqrt(8 // groups * 3 * 3)
    assert conv.weight.abs().max() <= bound and conv.bias.abs().max() <= bound
    for j in range(4):
        w, b = layer.bank[j].detach(), layer.bias[j].detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # the whole range, not a narrower one
        assert b.abs().max() <= bound
        assert abs(w.std() / conv.weight.std() - 1) < 0.15
        assert abs(w.std() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3)
    assert not torch.equal(layer.bank[0], layer.bank[1])  # K independent draws, not one copied


def test_dtype_and_device_arguments() -> None:
    layer = DynamicConv2d(3, 4, 3, dtype=torch.float64)
    assert {p.dtype for p in layer.parameters()} == {torch.float64}
    assert layer(randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64
    meta = DynamicConv2d(3, 4, 3, padding=1, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert meta(torch.empty(2, 3, 5, 5, device="meta")).shape == (2, 4, 5, 5)


CONV_ARGS = [
    ((3, 16, 3), {}),
    ((3, 16, (3, 5)), {"stride": 2, "padding": 1}),
    ((4, 8, 3), {"padding": "same", "dilation": 2, "groups": 2, "bias": False}),
    ((4, 8, 1), {"stride": (2, 1), "padding": (1, 2), "groups": 4}),
    ((4, 8, 3), {"padding": 1, "padding_mode": "circular"}),
]


@pytest.mark.parametrize("args, kwargs", CONV_ARGS)
def test_extra_repr_mirrors_conv2d(args: tuple, kwargs: dict[str, Any]) -> None:
    ours = DynamicConv2d(*args, **kwargs).extra_repr()
    assert ours == nn.Conv2d(*args, **kwargs).extra_repr() + ", num_kernels=4, temperature=1.0"


def test_extra_repr_shows_non_default_arguments_only() -> None:
    default = "3, 16, kernel_size=(3, 3), stride=(1, 1), num_kernels=4, temperature=1.0"
    assert DynamicConv2d(3, 16, 3).extra_repr() == default
    layer = DynamicConv2d(3, 16, 3, num_kernels=2, reduction=2, temperature=1, routing="sigmoid")
    assert layer.extra_repr() == (
        "3, 16, kernel_size=(3, 3), stride=(1, 1), num_kernels=2, reduction=2, temperature=1.0, routing=sigmoid"
    )


def test_works_inside_sequential_with_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        DynamicConv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        DynamicConv2d(8, 4, 3, stride=2, groups=2, temperature=1.0),
    )
    out = model(randn(4, 3, 8, 8))
    assert out.shape == (4, 4, 3, 3)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # The kernel banks and, through pi, the attention branch learn. (fc1 may get exactly 0
    # when every ReLU unit of its tiny hidden layer is off for this batch.)
    for name in ["0.weight", "0.bias", "0.fc2.bias", "3.weight", "3.bias", "3.fc2.bias"]:
        assert grads[name].abs().sum() > 0, name


# The layer's own arguments; stride, padding, dilation and groups go through the
# validator that tests/test_functional.py covers (one row shows the layer uses it).
BAD_LAYER_ARGS = [
    ({"num_kernels": 0}, r"num_kernels \(K\) must be a positive int, got 0"),
    ({"temperature": 0}, r"temperature must be >= 0.001 .*got 0"),
    ({"routing": "foo"}, r"routing must be one of \('softmax', 'sigmoid', 'condconv'\), got 'foo'"),
    (
        {"padding_mode": "mirror"},
        r"padding_mode must be one of \('zeros', 'reflect', 'replicate', 'circular'\), got 'mirror'",
    ),
    ({"reduction": 0}, r"reduction must be a positive int, got 0"),
    ({"in_channels": 0}, r"in_channels must be a positive int, got 0"),
    ({"out_channels": True}, r"out_channels must be a positive int, got True"),
    ({"out_channels": 5}, r"groups=2 must divide out_channels=5"),
    ({"kernel_size": 0}, r"kernel_size must be >= 1, got 0"),
    ({"kernel_size": 1.5}, r"kernel_size must be an int or a pair of ints, got 1\.5"),
]


@pytest.mark.parametrize("change, message", BAD_LAYER_ARGS, ids=[str(c) for c, _ in BAD_LAYER_ARGS])
def test_bad_constructor_arguments_raise(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_layer(**change)


BAD_INPUTS = [
    (randn(4, 6), ValueError, r"expects \[B, C, H, W\] or \[C, H, W\] input, got shape \(4, 6\)"),
    (randn(2, 3, 6, 6), ValueError, r"expects in_channels=4, got input of shape \(2, 3, 6, 6\)"),
    (randn(2, 4, 6, 6, dtype=torch.float64), TypeError,
     r"input is torch.float64 on cpu but the layer is torch.float32 on cpu"),
    (torch.ones(2, 4, 6, 6, dtype=torch.int64), TypeError,
     r"input is torch.int64 on cpu but the layer is torch.float32 on cpu"),
]


@pytest.mark.parametrize("x, error, message", BAD_INPUTS, ids=["2-D", "channels", "float64", "int64"])
def test_bad_inputs_raise(x: Tensor, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        make_layer()(x)


def timm_condconv2d(x: Tensor, routing_weights: Tensor, weight: Tensor, bias: Tensor, out_channels: int,
                    groups: int, padding: int) -> Tensor:
    """The forward of timm's ``CondConv2d`` (``timm/layers/cond_conv2d.py``), after its routing: the
    experts stored as ``weight`` ``[K, O*C/g*k*k]`` and ``bias`` ``[K, O]``, mixed by the routing
    weights and run as one grouped convolution."""
    B, C, H, W = x.shape
    weight_shape = (out_channels, C // groups, 3, 3)
    weight = torch.matmul(routing_weights, weight)
    new_weight_shape = (B * out_channels,) + weight_shape[1:]
    weight = weight.view(new_weight_shape)
    bias = torch.matmul(routing_weights, bias).view(B * out_channels)
    x = x.reshape(1, B * C, H, W)
    out = F.conv2d(x, weight, bias, stride=1, padding=padding, dilation=1, groups=groups * B)
    return out.permute([1, 0, 2, 3]).view(B, out_channels, out.shape[-2], out.shape[-1])


@pytest.mark.parametrize("groups", [1, 2])
def test_condconv_routing_is_timms(groups: int) -> None:
    """``routing='condconv'`` is CondConv's router as timm's EfficientNet block runs it, ``sigmoid(
    routing_fn(avgpool(x)))`` with one linear layer and no temperature, and the layer then computes
    what timm's ``CondConv2d`` computes with those routing weights and the same experts."""
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1, groups=groups, num_kernels=3, routing="condconv",
                          temperature=30.0, dtype=torch.float64)
    assert isinstance(layer.fc2, nn.Identity) and layer.fc1.out_features == 3
    x = randn(5, 4, 7, 7, dtype=torch.float64)
    routing_weights = torch.sigmoid(layer.fc1(F.adaptive_avg_pool2d(x, 1).flatten(1)))  # timm's routing_fn
    torch.testing.assert_close(layer.attention(x), routing_weights)  # no temperature, although tau = 30
    expected = timm_condconv2d(x, routing_weights, layer.bank.reshape(3, -1), layer.bias, 6, groups, 1)
    torch.testing.assert_close(layer(x), expected)
