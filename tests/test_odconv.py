"""``dyconv_teach.ODConv2d`` against the official ODConv (OSVAI/ODConv, ``modules/odconv.py``, Li, Zhou
and Yao, ICLR 2022): the official module's computation is written out below, as that file computes
it, and the package's layer must load its ``state_dict`` (the official checkpoints' layout) and then
compute the same, in training and in eval mode, over random settings."""

from __future__ import annotations

import random
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach import ODConv2d, set_temperature
from dyconv_teach.functional import TensorMismatchError


class OfficialAttention(nn.Module):
    """The official ``Attention`` of ``modules/odconv.py``: the same modules, names and arithmetic
    (``skip`` heads return 1.0)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, groups: int = 1,
                 reduction: float = 0.0625, kernel_num: int = 4, min_channel: int = 16) -> None:
        super().__init__()
        attention_channel = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = kernel_size, kernel_num, 1.0
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(in_planes, attention_channel, 1, bias=False)
        self.bn = nn.BatchNorm2d(attention_channel)
        self.relu = nn.ReLU(inplace=True)
        self.channel_fc = nn.Conv2d(attention_channel, in_planes, 1, bias=True)
        self.depthwise = in_planes == groups and in_planes == out_planes
        if not self.depthwise:
            self.filter_fc = nn.Conv2d(attention_channel, out_planes, 1, bias=True)
        if kernel_size != 1:
            self.spatial_fc = nn.Conv2d(attention_channel, kernel_size * kernel_size, 1, bias=True)
        if kernel_num != 1:
            self.kernel_fc = nn.Conv2d(attention_channel, kernel_num, 1, bias=True)

    def forward(self, x: Tensor) -> tuple:
        x = self.relu(self.bn(self.fc(self.avgpool(x))))
        B = x.size(0)
        channel = torch.sigmoid(self.channel_fc(x).view(B, -1, 1, 1) / self.temperature)
        filter_ = 1.0 if self.depthwise else torch.sigmoid(self.filter_fc(x).view(B, -1, 1, 1) / self.temperature)
        spatial = 1.0 if self.kernel_size == 1 else torch.sigmoid(
            self.spatial_fc(x).view(B, 1, 1, 1, self.kernel_size, self.kernel_size) / self.temperature)
        kernel = 1.0 if self.kernel_num == 1 else F.softmax(
            self.kernel_fc(x).view(B, -1, 1, 1, 1, 1) / self.temperature, dim=1)
        return channel, filter_, spatial, kernel


class OfficialODConv2d(nn.Module):
    """The official ``ODConv2d`` of ``modules/odconv.py`` (its ``_forward_impl_common`` and, for a
    1 x 1 kernel with K = 1, ``_forward_impl_pw1x``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, reduction: float = 0.0625, kernel_num: int = 4) -> None:
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation, self.groups, self.kernel_num = stride, padding, dilation, groups, \
            kernel_num
        self.attention = OfficialAttention(in_planes, out_planes, kernel_size, groups, reduction, kernel_num)
        self.weight = nn.Parameter(torch.randn(kernel_num, out_planes, in_planes // groups, kernel_size, kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        channel, filter_, spatial, kernel = self.attention(x)
        if self.kernel_size == 1 and self.kernel_num == 1:
            return F.conv2d(x * channel, self.weight.squeeze(0), None, self.stride, self.padding, self.dilation,
                            self.groups) * filter_
        batch_size, in_planes, height, width = x.size()
        x = (x * channel).reshape(1, -1, height, width)
        aggregate_weight = torch.sum(spatial * kernel * self.weight.unsqueeze(dim=0), dim=1).view(
            [-1, self.in_planes // self.groups, self.kernel_size, self.kernel_size])
        output = F.conv2d(x, aggregate_weight, None, self.stride, self.padding, self.dilation,
                          self.groups * batch_size)
        return output.view(batch_size, self.out_planes, output.size(-2), output.size(-1)) * filter_


def random_configs(n: int, seed: int) -> List[Dict[str, Any]]:
    """Random layers that between them are depthwise, 1 x 1, K = 1, grouped, strided and dilated."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        kind = ("dense", "depthwise", "pointwise", "grouped")[i % 4]
        C = rng.choice([4, 8, 16])
        O = C if kind == "depthwise" else rng.choice([4, 8, 12])
        groups = {"dense": 1, "depthwise": C, "pointwise": 1, "grouped": 2}[kind]
        k = 1 if kind == "pointwise" else rng.choice([3, 5])
        configs.append({"in_planes": C, "out_planes": O, "kernel_size": k, "groups": groups,
                        "stride": rng.choice([1, 2]), "padding": k // 2, "dilation": rng.choice([1, 1, 2]),
                        # K = 1 in every other round of the four kinds, so that each kind meets it
                        "kernel_num": 1 if (i // 4) % 2 else rng.choice([2, 4]),
                        "reduction": rng.choice([0.0625, 0.25])})
    return configs


CONFIGS = random_configs(16, seed=22)


def test_configs_cover_the_special_cases() -> None:
    assert any(c["groups"] == c["in_planes"] == c["out_planes"] for c in CONFIGS)  # depthwise: no filter head
    assert any(c["kernel_size"] == 1 and c["kernel_num"] == 1 for c in CONFIGS)  # the official pw1x path
    assert any(c["kernel_size"] == 1 and c["kernel_num"] > 1 for c in CONFIGS)  # no spatial head
    assert any(c["kernel_num"] == 1 and c["kernel_size"] > 1 for c in CONFIGS)  # no kernel head
    assert any(1 < c["groups"] < c["in_planes"] for c in CONFIGS)
    assert any(c["stride"] == 2 for c in CONFIGS) and any(c["dilation"] == 2 for c in CONFIGS)


def official_and_ours(config: Dict[str, Any], seed: int) -> tuple:
    """An official module with random parameters and BatchNorm statistics, and ours loaded from its
    state_dict (the official layout), both float64."""
    torch.manual_seed(seed)
    official = OfficialODConv2d(**config).double()
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0, 0.5)
        official.attention.bn.running_mean.normal_(0, 0.5)
        official.attention.bn.running_var.uniform_(0.5, 2.0)
    c = dict(config)
    ours = ODConv2d(c.pop("in_planes"), c.pop("out_planes"), c.pop("kernel_size"), num_kernels=c.pop("kernel_num"),
                    dtype=torch.float64, **c)
    ours.load_state_dict(official.state_dict())
    return official, ours


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("index, config", list(enumerate(CONFIGS)), ids=[str(c) for c in CONFIGS])
def test_equals_the_official_module(index: int, config: Dict[str, Any], mode: str) -> None:
    """Loaded with the official state_dict, the layer computes what the official module computes, its
    gradients included (input and every parameter), in training mode (BatchNorm on batch statistics,
    which it updates alike) and in eval mode (running statistics), at temperature 1 and 5."""
    official, ours = official_and_ours(config, seed=index)
    official.train(mode == "train")
    ours.train(mode == "train")
    for tau in (1.0, 5.0):
        official.attention.temperature = tau
        set_temperature(ours, tau)
        x = torch.randn(3, config["in_planes"], 9, 8, dtype=torch.float64, requires_grad=True)
        expected, out = official(x), ours(x)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        names = [n for n, _ in official.named_parameters()]
        theirs = dict(zip(names, torch.autograd.grad(expected.square().sum(), [x, *official.parameters()])[1:]))
        mine = dict(zip([n for n, _ in ours.named_parameters()],
                        torch.autograd.grad(out.square().sum(), [x, *ours.parameters()])[1:]))
        for name, grad in theirs.items():
            got = mine[name]
            torch.testing.assert_close(got.reshape(grad.shape), grad, rtol=1e-9, atol=1e-10, msg=name)
    torch.testing.assert_close(ours.attention.bn.running_mean, official.attention.bn.running_mean)


def test_state_dict_keys_are_the_officials() -> None:
    """Every key of the official module is a key of ours, with the same number of values, and no other."""
    official, ours = official_and_ours(CONFIGS[0], seed=0)
    theirs = {k: v.numel() for k, v in official.state_dict().items()}
    assert {k: v.numel() for k, v in ours.state_dict().items()} == theirs


def test_batch_of_one_in_training_is_an_error_as_in_the_official_module() -> None:
    """The router's BatchNorm normalises over the batch: one sample in training mode has one value per
    channel, and both modules refuse (ours says why); in eval mode the running statistics serve."""
    official, ours = official_and_ours(CONFIGS[0], seed=0)
    x = torch.randn(1, CONFIGS[0]["in_planes"], 9, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        official.train()(x)
    with pytest.raises(ValueError, match="a batch of 1 sample has nothing to normalise over"):
        ours.train()(x)
    torch.testing.assert_close(ours.eval()(x), official.eval()(x))


def test_recipes() -> None:
    """What DynamicConv2d supports: B = 0, channels_last (model.to), autocast, torch.compile with a
    dynamic batch (no graph break) and torch.export with one."""
    torch.manual_seed(0)
    layer = ODConv2d(8, 16, 3, padding=1).eval()
    assert layer(torch.randn(0, 8, 6, 6)).shape == (0, 16, 6, 6)
    x = torch.randn(4, 8, 6, 6)
    expected = layer(x)
    cl = layer.to(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, dynamic=True, backend="aot_eager")
    for B in (2, 3, 5):
        xb = torch.randn(B, 8, 6, 6, requires_grad=True)
        torch.testing.assert_close(compiled(xb), layer(xb), rtol=1e-5, atol=1e-6)
        compiled(xb).sum().backward()
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x7 = torch.randn(7, 8, 6, 6)
    torch.testing.assert_close(program.module()(x7), layer(x7), rtol=1e-5, atol=1e-6)


def test_errors() -> None:
    layer = ODConv2d(8, 16, 3)
    with pytest.raises(TensorMismatchError, match=r"expects \[B, C, H, W\] input with C = in_channels = 8"):
        layer(torch.randn(2, 5, 6, 6))
    with pytest.raises(RuntimeError, match="input is torch.float64 on cpu but the layer is torch.float32"):
        layer(torch.randn(2, 8, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="ODConv2d takes numeric padding"):
        ODConv2d(8, 16, 3, padding="same")
