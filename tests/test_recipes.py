"""DynamicConv2d in the recipes people use with nn.Conv2d: mixed precision, channels_last,
torch.compile / export / fx / jit with any batch size, and nn.Conv2d's conventions; then the
same recipes for DynamicConv1d and DynamicConv3d.

Each test builds the same small model twice, once with ``nn.Conv2d`` and once with
``DynamicConv2d``, or compares the layer against the per-sample loop.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach import DynamicConv1d, DynamicConv2d, DynamicConv3d
from dyconv_teach.reference import per_sample_conv


def model(conv: Callable[..., nn.Module]) -> nn.Sequential:
    """A stem conv, then two layers of the kind under test (one grouped and strided)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        conv(8, 16, 3, padding=1),
        nn.ReLU(),
        conv(16, 16, 3, stride=2, groups=2),
    ).eval()


def batch(B: int, seed: int = 0) -> Tensor:
    return torch.randn(B, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


# -- mixed precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_like_conv2d(dtype: torch.dtype) -> None:
    """Under autocast a low-precision input from the previous layer is fine (float32
    parameters), the output is in the autocast dtype, close to the float32 result, and
    backward gives float32 gradients; the attention itself stays float32."""
    net, static = model(DynamicConv2d).train(), model(nn.Conv2d).train()
    x = batch(4)
    reference = net(x)
    with torch.autocast("cpu", dtype=dtype):
        out = net(x)
        assert out.dtype == static(x).dtype == dtype
        assert net[3].last_attention.dtype == torch.float32
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    assert net[3].weight.grad.dtype == torch.float32 and torch.isfinite(net[3].weight.grad).all()


def test_mismatched_dtype_outside_autocast_is_a_clear_error() -> None:
    layer = DynamicConv2d(8, 16, 3)
    with pytest.raises(TypeError, match=r"input is torch.bfloat16 on cpu but the layer is torch.float32 on cpu"):
        layer(torch.randn(2, 8, 6, 6, dtype=torch.bfloat16))


# -- memory formats ----------------------------------------------------------------------------


def test_model_to_channels_last_keeps_results_and_format() -> None:
    net = model(DynamicConv2d)
    x = batch(3)
    expected = net(x)
    net = net.to(memory_format=torch.channels_last)  # a 5-D parameter would make this raise
    assert net[3].weight.is_contiguous(memory_format=torch.channels_last)
    out = net(x.to(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    out.sum().backward()


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_keeps_the_input_memory_format(channels_last: bool) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=fmt)
    for layer in (nn.Conv2d(8, 4, 3), DynamicConv2d(8, 4, 3)):
        assert layer(x).is_contiguous(memory_format=fmt)


# -- graphs with any batch size ----------------------------------------------------------------


def compiles_over_batches(net: nn.Module, batches: tuple, **compile_kwargs: Any) -> list:
    """Compile ``net`` (fullgraph), run it with backward at each batch size against eager,
    and return dynamo's count of compilations after each batch size."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(compile_kwargs.pop("backend", "eager"))
    compiled = torch.compile(net, backend=counter, fullgraph=True, **compile_kwargs)
    counts = []
    for B in batches:
        x = batch(B, seed=B).requires_grad_()
        out = compiled(x)
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
        out.sum().backward()
        counts.append(counter.frame_count)
    return counts


@pytest.mark.parametrize("dynamic", [None, True])
def test_compile_needs_no_more_graphs_than_conv2d(dynamic: Any) -> None:
    """Batch sizes 2..16: as many compilations as the same model with nn.Conv2d (whose
    own fake convolution guards on B <= 15), where the first edition of this layer needed one per B."""
    batches = (2, 3, 4, 5, 8, 16)
    ours = compiles_over_batches(model(DynamicConv2d), batches, dynamic=dynamic)
    theirs = compiles_over_batches(model(nn.Conv2d), batches, dynamic=dynamic)
    assert ours == theirs and ours[-1] <= 3, (ours, theirs)


def test_compile_with_inductor_serves_every_batch_size() -> None:
    """Inductor compiles once (for the first batch size) and reuses it for the others."""
    counts = compiles_over_batches(model(DynamicConv2d), (2, 3, 5, 7), backend="inductor", dynamic=True)
    assert counts == [counts[0]] * 4, counts


@pytest.mark.parametrize("strict", [False, True])
def test_export_with_an_unbounded_batch_dimension(strict: bool) -> None:
    """Exported with a symbolic batch (by torch's default tracer, or strictly by dynamo's), the
    program holds the K-branch sum: convolutions whose ``groups`` is a number, not the batch."""
    from torch.export import Dim, export

    net = model(DynamicConv2d)
    program = export(net, (batch(4),), dynamic_shapes=({0: Dim("batch")},), strict=strict)
    convs = [n for n in program.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    groups = [n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1) for n in convs]  # conv2d's 7th argument
    assert convs and all(type(g) is int for g in groups), groups
    for B in (1, 3, 33):
        torch.testing.assert_close(program.module()(batch(B)), net(batch(B)), rtol=1e-4, atol=1e-5)


def test_fx_symbolic_trace() -> None:
    net = model(DynamicConv2d)
    traced = torch.fx.symbolic_trace(net)
    torch.testing.assert_close(traced(batch(3)), net(batch(3)))


def test_jit_trace_at_one_batch_size_runs_at_another() -> None:
    net = model(DynamicConv2d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(net, batch(2))
    torch.testing.assert_close(traced(batch(3)), net(batch(3)), rtol=1e-5, atol=1e-6)


# -- nn.Conv2d's conventions -------------------------------------------------------------------


def test_empty_batch_like_conv2d() -> None:
    x = torch.randn(0, 8, 6, 6, requires_grad=True)
    layer = DynamicConv2d(8, 4, 3, padding=1)
    out = layer(x)
    assert out.shape == nn.Conv2d(8, 4, 3, padding=1)(x).shape == (0, 4, 6, 6)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_unbatched_input_like_conv2d() -> None:
    layer = DynamicConv2d(8, 4, 3, padding=1, temperature=1.0)
    x = torch.randn(8, 6, 6)
    out = layer(x)
    assert out.shape == nn.Conv2d(8, 4, 3, padding=1)(x).shape == (4, 6, 6)
    torch.testing.assert_close(out, layer(x[None])[0])
    assert layer.last_attention.shape == (1, 4)


def test_numpy_integers_as_arguments() -> None:
    np = pytest.importorskip("numpy")
    args = (np.int64(8), np.int64(4), np.int64(3))
    kwargs = {"stride": np.int64(2), "padding": np.int32(1), "groups": np.int64(2)}
    layer = DynamicConv2d(*args, **kwargs, num_kernels=np.int64(3))
    assert layer(torch.randn(2, 8, 6, 6)).shape == nn.Conv2d(*args, **kwargs)(torch.randn(2, 8, 6, 6)).shape
    assert type(layer.in_channels) is int and layer.stride == (2, 2) and layer.bank.shape[0] == 3


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"])
def test_padding_modes_like_conv2d(padding_mode: str, padding: Any) -> None:
    """With K = 1 the layer is a static convolution: it must equal nn.Conv2d with the same
    weights in every padding mode (and, with K = 3, the per-sample loop on the padded input)."""
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    one = DynamicConv2d(4, 6, (3, 2), padding=padding, padding_mode=padding_mode, num_kernels=1, dtype=torch.float64)
    conv = nn.Conv2d(4, 6, (3, 2), padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(one.bank[0])
        conv.bias.copy_(one.bias[0])
    torch.testing.assert_close(one(x), conv(x))
    layer = DynamicConv2d(4, 6, (3, 2), padding=padding, padding_mode=padding_mode, num_kernels=3, dtype=torch.float64)
    out = layer(x)
    if padding_mode != "zeros":
        x, padding = F.pad(x, layer._reversed_padding_repeated_twice, mode=padding_mode), 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # F.conv2d on 'same' with an even kernel
        expected = per_sample_conv(x, layer.bank, layer.last_attention, layer.bias, padding=padding)
    torch.testing.assert_close(out, expected)


def test_tiny_temperature_is_refused_not_nan() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0.001"):
        DynamicConv2d(8, 4, 3, temperature=1e-40)


def test_fuse_conv_bn_eval_does_not_apply() -> None:
    """torch's Conv-BN fusion assumes one weight row per output channel; with K kernels per
    output channel it must fail loudly (as documented), not return a silently wrong module."""
    layer, bn = DynamicConv2d(8, 4, 3, num_kernels=4).eval(), nn.BatchNorm2d(4).eval()
    with pytest.raises(RuntimeError):
        torch.nn.utils.fuse_conv_bn_eval(layer, bn)  # type: ignore[arg-type]


# -- the same recipes in 1-D and 3-D ------------------------------------------------------------

LAYERS = {1: DynamicConv1d, 3: DynamicConv3d}
CONVS = {1: nn.Conv1d, 3: nn.Conv3d}
SIZES = {1: (20,), 3: (4, 6, 6)}  # a sequence, and a small video clip (frames, height, width)


def model_nd(dims: int, dynamic: bool = True) -> nn.Sequential:
    """The model above in ``dims`` spatial dimensions."""
    conv = LAYERS[dims] if dynamic else CONVS[dims]
    torch.manual_seed(0)
    return nn.Sequential(CONVS[dims](3, 8, 3, padding=1), nn.ReLU(), conv(8, 16, 3, padding=1), nn.ReLU(),
                         conv(16, 16, 3, stride=2, groups=2)).eval()


def batch_nd(dims: int, B: int, seed: int = 0) -> Tensor:
    return torch.randn(B, 3, *SIZES[dims], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dims", [1, 3])
def test_autocast_in_1d_and_3d(dims: int) -> None:
    net = model_nd(dims).train()
    x = batch_nd(dims, 4)
    reference = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        assert out.dtype == model_nd(dims, dynamic=False)(x).dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().square().mean().backward()
    assert net[2].weight.grad.dtype == torch.float32


def test_channels_last_3d() -> None:
    net = model_nd(3)
    x = batch_nd(3, 3)
    expected = net(x)
    net = net.to(memory_format=torch.channels_last_3d)
    assert net[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    out = net(x.to(memory_format=torch.channels_last_3d))
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_compile_and_export_with_any_batch_in_1d_and_3d(dims: int) -> None:
    """One inductor graph and one exported program serve every batch size, as in 2-D."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.export import Dim, export

    net = model_nd(dims)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(net, backend=counter, dynamic=True)
    for B in (2, 3, 5):
        x = batch_nd(dims, B, seed=B).requires_grad_()
        out = compiled(x)
        torch.testing.assert_close(out, net(x), rtol=1e-4, atol=1e-5)
        out.sum().backward()
    assert counter.frame_count == 1
    program = export(net, (batch_nd(dims, 4),), dynamic_shapes=({0: Dim("batch")},))
    for B in (1, 3):
        torch.testing.assert_close(program.module()(batch_nd(dims, B)), net(batch_nd(dims, B)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_empty_and_unbatched_input_in_1d_and_3d(dims: int) -> None:
    layer, conv = LAYERS[dims](3, 4, 3, padding=1), CONVS[dims](3, 4, 3, padding=1)
    x = torch.randn(0, 3, *SIZES[dims], requires_grad=True)
    out = layer(x)
    assert out.shape == conv(x).shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    one = batch_nd(dims, 1)
    torch.testing.assert_close(layer(one[0]), layer(one)[0])
