"""Tests of the functional core, :func:`dynamic_conv1d`, :func:`dynamic_conv2d` and
:func:`dynamic_conv3d`: every strategy it can run against the slow references over random
configurations in 1, 2 and 3 spatial dimensions, gradients, batch independence, the
dispatch rule, and the errors it raises before torch does."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dyconv_teach import functional, strategies
from dyconv_teach._utils import Padding, balanced_orders
from dyconv_teach.functional import STRATEGY_NAMES, dynamic_conv1d, dynamic_conv2d, dynamic_conv3d
from dyconv_teach.reference import kernel_sum_conv, per_sample_conv

# float32 sums of a few hundred products in a different order: a few ulps of outputs of size ~10.
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float64: {"rtol": 1e-10, "atol": 1e-10}}

#: The core by number of spatial dimensions.
CORE: dict[int, Callable[..., Tensor]] = {1: dynamic_conv1d, 2: dynamic_conv2d, 3: dynamic_conv3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class Case:
    """One configuration of the core: shapes, conv hyper-parameters, layout and dtype."""

    B: int
    K: int
    C: int
    O: int
    groups: int
    kernel: Tuple[int, ...]
    size: Tuple[int, ...]
    stride: Any
    padding: Padding
    dilation: Any
    bias: bool
    channels_last: bool
    dtype: torch.dtype

    @property
    def dims(self) -> int:
        return len(self.size)

    def __str__(self) -> str:
        return (
            f"{self.dims}d-B{self.B}-K{self.K}-C{self.C}-O{self.O}-g{self.groups}-k{self.kernel}-{self.size}"
            f"-s{self.stride}-p{self.padding}-d{self.dilation}-bias{int(self.bias)}"
            f"-{'cl' if self.channels_last else 'cf'}-{str(self.dtype)[6:]}"
        )


def random_cases(n: int, seed: int) -> list[Case]:
    """Draw ``n`` valid configurations (output at least 1 pixel) from a seeded generator,
    cycling through 1, 2 and 3 spatial dimensions (3-D ones smaller)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        dims = (2, 1, 3)[i % 3]
        kind = rng.choice(["plain", "grouped", "depthwise"])
        if kind == "plain":
            groups, C, O = 1, rng.randint(1, 5), rng.randint(1, 6)
        elif kind == "grouped":
            groups, C, O = 2, 2 * rng.randint(1, 3), 2 * rng.randint(1, 3)
        else:
            C = rng.randint(2, 4)
            groups, O = C, C * rng.randint(1, 2)
        most = 3 if dims == 3 else 4
        kernel = tuple(rng.randint(1, most) for _ in range(dims))
        dilation = rng.choice([1, 1, 2, tuple(rng.randint(1, 2) for _ in range(dims))])
        padding = rng.choice([0, 1, tuple(rng.randint(0, 2) for _ in range(dims)), "same", "valid"])
        stride = 1 if padding == "same" else rng.choice([1, 2, tuple(rng.randint(1, 2) for _ in range(dims)), 3])
        d = (dilation,) * dims if isinstance(dilation, int) else dilation
        # The smallest input the dilated kernel fits in without padding, plus a random margin.
        size = tuple(dd * (k - 1) + 1 + rng.randint(0, 5 if dims < 3 else 2) for k, dd in zip(kernel, d))
        cases.append(
            Case(
                B=rng.choice([1, 1, 2, 3, 5, 9, 17] if dims < 3 else [1, 2, 3, 5]),
                K=rng.choice([1, 2, 4]),
                C=C,
                O=O,
                groups=groups,
                kernel=kernel,
                size=size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=rng.random() < 0.5,
                # (in 3-D only with C > 1: torch's rule for a [B, 1, ...] input depends on its strides)
                channels_last=dims > 1 and (dims == 2 or C > 1) and rng.random() < 0.5,
                dtype=rng.choice([torch.float32, torch.float64]),
            )
        )
    return cases


CASES = random_cases(72, seed=2020)
CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}


def make_tensors(case: Case, seed: int) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Random ``x, weight, attention, bias`` for ``case``; attention is any real [B, K]
    (the identity is linear in it, so it need not be a softmax)."""
    gen = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = {"generator": gen, "dtype": case.dtype}
    x = torch.randn(case.B, case.C, *case.size, **kw)
    if case.channels_last:
        x = x.to(memory_format=CHANNELS_LAST[case.dims])
    weight = torch.randn(case.K, case.O, case.C // case.groups, *case.kernel, **kw)
    attention = torch.randn(case.B, case.K, **kw)
    bias = torch.randn(case.K, case.O, **kw) if case.bias else None
    return x, weight, attention, bias


def conv_kwargs(case: Case) -> dict[str, Any]:
    """The stride, padding, dilation and groups of ``case`` as keyword arguments."""
    return {"stride": case.stride, "padding": case.padding, "dilation": case.dilation, "groups": case.groups}


def test_cases_cover_every_feature() -> None:
    """The random draw really contains every feature the equality test is meant to cover,
    in every number of spatial dimensions."""
    for dims in (1, 2, 3):
        cases = [c for c in CASES if c.dims == dims]
        assert any(c.B == 1 for c in cases) and any(c.B > 2 for c in cases)
        assert any(c.K == 1 for c in cases) and any(c.K > 1 for c in cases)
        assert any(c.groups > 1 for c in cases)
        assert any(c.padding == "same" for c in cases) and any(isinstance(c.stride, tuple) for c in cases)
        assert any(c.bias for c in cases) and any(not c.bias for c in cases)
        assert any(c.channels_last for c in cases) or dims == 1
    assert any(c.B > 16 for c in CASES)
    assert any(c.groups == 2 and c.C > 2 for c in CASES)
    assert any(c.groups == c.C > 1 for c in CASES)
    assert any(c.stride == 2 for c in CASES)
    assert any(c.padding == "valid" for c in CASES)
    assert any(isinstance(c.padding, tuple) for c in CASES) and any(c.padding == 1 for c in CASES)
    assert any(c.dilation != 1 for c in CASES)
    assert any(len(set(c.kernel)) > 1 for c in CASES)
    assert {c.dtype for c in CASES} == {torch.float32, torch.float64}


#: 'auto', 'benchmark' and every strategy that runs on CPU tensors (the fused kernels: their C
#: build, where a C compiler is found; the Triton kernels have tests/test_triton_conv.py).
CPU_STRATEGIES = ("auto", "benchmark", *(name for name, s in strategies.STRATEGIES.items() if "cpu" in s.devices))


def runs_in(strategy: str, dims: int) -> None:
    """Skip a case of a strategy that does not run ``dims``-D convolutions (the fused kernels: 2-D)."""
    if strategy in strategies.STRATEGIES and dims not in strategies.STRATEGIES[strategy].dims:
        pytest.skip(f"{strategy} runs {strategies.STRATEGIES[strategy].dims}-D convolutions only")


def test_every_strategy_is_tested() -> None:
    """The parametrised tests below run every CPU strategy of the registry in every dimension it
    runs, so a strategy added later is tested without editing this file."""
    assert set(STRATEGY_NAMES) == {"auto", "benchmark", *strategies.STRATEGIES} and len(CPU_STRATEGIES) >= 6
    assert set(STRATEGY_NAMES) == set(CPU_STRATEGIES)  # this machine has a C compiler: CI runs the C kernels
    assert all(strategies.STRATEGIES[name].dims == (1, 2, 3) for name in CPU_STRATEGIES[2:] if name != "fused")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("index, case", list(enumerate(CASES)), ids=[str(c) for c in CASES])
def test_matches_both_references(index: int, case: Case, strategy: str) -> None:
    runs_in(strategy, case.dims)
    x, weight, attention, bias = make_tensors(case, seed=index)
    out = CORE[case.dims](x, weight, attention, bias, **conv_kwargs(case), strategy=strategy)
    expected = per_sample_conv(x, weight, attention, bias, **conv_kwargs(case))
    assert out.shape == expected.shape and out.dtype == case.dtype
    torch.testing.assert_close(out, expected, **TOLERANCE[case.dtype])
    expected = kernel_sum_conv(x, weight, attention, bias, **conv_kwargs(case))
    torch.testing.assert_close(out, expected, **TOLERANCE[case.dtype])
    # The output keeps the input's memory format, as F.conv2d's does (F.conv3d keeps it in
    # some of its CPU kernels only; the core always does).
    if case.dims == 2:
        static = F.conv2d(x, weight[0], **conv_kwargs(case))
        for fmt in (torch.contiguous_format, torch.channels_last):
            assert out.is_contiguous(memory_format=fmt) == static.is_contiguous(memory_format=fmt)
    else:
        fmt = CHANNELS_LAST[case.dims] if case.channels_last else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_batch_of_one_is_a_plain_conv_with_the_mixed_kernel(groups: int, dims: int, strategy: str) -> None:
    runs_in(strategy, dims)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, *(7,) * dims, generator=gen, dtype=torch.float64)
    weight = torch.randn(3, 6, 4 // groups, *(3,) * dims, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    pi = torch.softmax(torch.randn(1, 3, generator=gen, dtype=torch.float64), dim=1)
    mixed_weight = sum(pi[0, j] * weight[j] for j in range(3))
    mixed_bias = sum(pi[0, j] * bias[j] for j in range(3))
    expected = CONV[dims](x, mixed_weight, mixed_bias, stride=2, padding=1, groups=groups)
    out = CORE[dims](x, weight, pi, bias, stride=2, padding=1, groups=groups, strategy=strategy)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


GRADCHECK_CASES = [
    # B, C, O, K, groups, kernel, size, conv kwargs, bias
    (2, 4, 4, 3, 2, (3, 3), (5, 5), {"stride": 2, "padding": 1}, True),
    (3, 3, 6, 2, 3, (2, 3), (5, 4), {"padding": "same", "dilation": (2, 1)}, True),
    (2, 2, 3, 2, 1, (3, 1), (6, 4), {"stride": (2, 1), "padding": (1, 0)}, False),
    (9, 2, 2, 2, 1, (3, 3), (4, 4), {"padding": 1}, True),
    (3, 4, 2, 3, 2, (3,), (7,), {"stride": 2, "padding": 1, "dilation": 2}, True),
    (2, 2, 4, 2, 1, (2,), (5,), {"padding": "same"}, False),
    (2, 2, 4, 2, 2, (2, 3, 2), (4, 4, 3), {"stride": (1, 2, 1), "padding": 1}, True),
    (3, 3, 3, 2, 1, (1, 3, 3), (2, 4, 5), {"padding": (0, 1, 1), "dilation": (1, 1, 2)}, False),
]


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("B, C, O, K, groups, kernel, size, conv, has_bias", GRADCHECK_CASES)
def test_gradcheck(
    B: int, C: int, O: int, K: int, groups: int, kernel: Tuple[int, ...], size: Tuple[int, ...], conv: dict,
    has_bias: bool, strategy: str,
) -> None:
    dims = len(size)
    runs_in(strategy, dims)
    gen = torch.Generator().manual_seed(3)
    kw: dict[str, Any] = {"generator": gen, "dtype": torch.float64}
    x = torch.randn(B, C, *size, **kw).requires_grad_()
    weight = torch.randn(K, O, C // groups, *kernel, **kw).requires_grad_()
    attention = torch.randn(B, K, **kw).requires_grad_()
    bias = torch.randn(K, O, **kw).requires_grad_() if has_bias else None

    def f(x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor]) -> Tensor:
        return CORE[dims](x, weight, attention, bias, groups=groups, **conv, strategy=strategy)

    assert torch.autograd.gradcheck(f, (x, weight, attention, bias))
    if dims > 1:  # channels_last input and gradients only for some inputs take other paths
        x_cl = x.detach().to(memory_format=CHANNELS_LAST[dims]).requires_grad_()
        assert torch.autograd.gradcheck(lambda x: f(x, weight.detach(), attention, None), (x_cl,))


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
def test_second_derivatives(strategy: str) -> None:
    """Gradient penalties differentiate a gradient: autograd differentiates every strategy twice
    (gradgradcheck, float64, bias and groups; the fused kernels' gradients, not differentiable
    themselves, are batch-as-groups' where a graph of them is asked for)."""
    gen = torch.Generator().manual_seed(4)
    kw: dict[str, Any] = {"generator": gen, "dtype": torch.float64, "requires_grad": True}
    args = (torch.randn(3, 4, 5, 5, **kw), torch.randn(2, 4, 2, 3, 3, **kw), torch.randn(3, 2, **kw),
            torch.randn(2, 4, **kw))
    assert torch.autograd.gradgradcheck(
        lambda *t: dynamic_conv2d(*t, padding=1, groups=2, strategy=strategy), args)


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_independence(dims: int, strategy: str) -> None:
    """Sample i's output never depends on sample j's input or attention row."""
    runs_in(strategy, dims)
    B = 10
    gen = torch.Generator().manual_seed(5)
    kw: dict[str, Any] = {"generator": gen, "dtype": torch.float64}
    x = torch.randn(B, 4, *(6,) * dims, **kw)
    weight = torch.randn(3, 6, 2, *(3,) * dims, **kw)
    attention = torch.randn(B, 3, **kw)
    bias = torch.randn(3, 6, **kw)
    conv: dict[str, Any] = {"stride": 2, "padding": 1, "groups": 2, "strategy": strategy}
    out = CORE[dims](x, weight, attention, bias, **conv)
    for j in range(B):
        x2, attention2 = x.clone(), attention.clone()
        x2[j] = torch.randn(x[j].shape, **kw)
        attention2[j] = torch.randn(attention[j].shape, **kw)
        out2 = CORE[dims](x2, weight, attention2, bias, **conv)
        assert not torch.allclose(out2[j], out[j])  # the change is visible where it belongs...
        others = [i for i in range(B) if i != j]
        torch.testing.assert_close(out2[others], out[others], rtol=0, atol=0)  # ...and nowhere else


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_batch_independence_of_gradients(dims: int, strategy: str) -> None:
    """d out[i] / d x[j] and d out[i] / d attention[j] are exactly zero for j != i."""
    runs_in(strategy, dims)
    B = 10
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(B, 2, *(5,) * dims, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, 2, *(3,) * dims, generator=gen, dtype=torch.float64)
    attention = torch.randn(B, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    out = CORE[dims](x, weight, attention, padding=1, strategy=strategy)
    for i in range(B):
        grad_x, grad_attention = torch.autograd.grad(out[i].sum(), (x, attention), retain_graph=True)
        for j in range(B):
            if j == i:
                assert grad_x[j].abs().sum() > 0 and grad_attention[j].abs().sum() > 0
            else:
                assert torch.count_nonzero(grad_x[j]) == 0 and torch.count_nonzero(grad_attention[j]) == 0


def bank(K: int, C: int, O: int, k: int = 3, dims: int = 2) -> Tensor:
    """A kernel bank on the meta device: shapes and sizes without memory."""
    return torch.empty(K, O, C, *(k,) * dims, device="meta")


@pytest.mark.parametrize(
    "device, B, C, hw, expected",
    [
        # CPU: K-branch sum past 32 MiB of mixed weights when (K - 1) * H' * W' <= 256.
        ("cpu", 32, 256, 7, "kernel_branches"),  # 72 MiB, 3 * 49 = 147
        ("cpu", 1, 256, 7, "batch_as_groups"),  # 2.25 MiB
        ("cpu", 14, 256, 7, "batch_as_groups"),  # 31.5 MiB: just under
        ("cpu", 15, 256, 7, "kernel_branches"),  # 33.75 MiB: just over
        ("cpu", 32, 128, 14, "batch_as_groups"),  # 18 MiB
        ("cpu", 128, 128, 14, "batch_as_groups"),  # 72 MiB, but 3 * 196 = 588 > 256
        # CUDA: past 64 MiB when (K - 1) * H' * W' <= 600.
        ("cuda", 32, 256, 7, "kernel_branches"),  # 72 MiB
        ("cuda", 128, 128, 14, "kernel_branches"),  # 72 MiB, 588
        ("cuda", 256, 128, 28, "batch_as_groups"),  # 144 MiB, but 3 * 784 = 2352
        ("cuda", 16, 256, 7, "batch_as_groups"),  # 36 MiB
    ],
)
def test_dispatch_rule(device: str, B: int, C: int, hw: int, expected: str) -> None:
    assert strategies.choose(device, B, bank(4, C, C), (hw, hw)) == expected


@pytest.mark.parametrize("dims, out, mib, expected", [
    (1, (49,), 24, "batch_as_groups"),  # 3 * 49 = 147, but 24 MiB < 32 MiB
    (3, (7, 7, 1), 216, "kernel_branches"),  # 216 MiB, 3 * 49 = 147
    (3, (7, 7, 7), 216, "batch_as_groups"),  # 3 * 343 = 1029 > 256
])
def test_dispatch_rule_in_1d_and_3d(dims: int, out: Tuple[int, ...], mib: int, expected: str) -> None:
    """In 1-D and 3-D the rule weighs the same quantities: the mixed weights' bytes (B = 32,
    C = O = 256, 3-wide kernels) and (K - 1) times the output's pixels, all spatial axes together."""
    weight = bank(4, 256, 256, k=3, dims=dims)
    assert strategies.mixed_weight_bytes(32, weight) == mib * 2**20
    assert strategies.choose("cpu", 32, weight, out) == expected


def test_dynamic_conv2d_runs_the_strategy_the_rule_chooses(monkeypatch: pytest.MonkeyPatch) -> None:
    """'auto' runs what :func:`strategies.choose` says (meta tensors: the deep layer's shapes
    without its memory or time)."""
    ran: list[str] = []
    for name, strategy in list(strategies.STRATEGIES.items()):

        def record(run: Any, name: str = name) -> Any:
            return lambda *args: (ran.append(name), run(*args))[1]

        monkeypatch.setitem(strategies.STRATEGIES, name, strategy._replace(run=record(strategy.run)))
    for B, expected in ((32, "kernel_branches"), (1, "batch_as_groups")):
        ran.clear()
        x = torch.empty(B, 256, 7, 7, device="meta")
        out = dynamic_conv2d(x, bank(4, 256, 256), torch.empty(B, 4, device="meta"), padding=1)
        assert out.shape == (B, 256, 7, 7) and ran == [expected]


def test_benchmark_times_the_strategies_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """'benchmark' times every strategy that runs on the device the first time it meets a shape,
    remembers the fastest, and then only runs that one: a new shape, or a call without gradients,
    is timed afresh. It leaves the caller's tensors without gradients of their own."""
    monkeypatch.setattr(strategies, "_BENCHMARKED", {})
    calls: list[str] = []
    for name, strategy in list(strategies.STRATEGIES.items()):

        def record(run: Any, name: str = name) -> Any:
            return lambda *args: (calls.append(name), run(*args))[1]

        monkeypatch.setitem(strategies.STRATEGIES, name, strategy._replace(run=record(strategy.run)))
    cpu = list(CPU_STRATEGIES[2:])
    x, weight, attention, bias = (t.requires_grad_() for t in valid_args().values() if isinstance(t, Tensor))
    out = dynamic_conv2d(x, weight, attention, bias, groups=2, strategy="benchmark")
    rounds = len(balanced_orders(len(cpu)))  # one Williams design
    assert set(calls[:-1]) == set(cpu) and len(calls) == 1 + len(cpu) * (1 + rounds)  # a warm-up, then the rounds
    (chosen,) = set(strategies._BENCHMARKED.values())
    assert calls[-1] == chosen and x.grad is None and weight.grad is None
    calls.clear()
    torch.testing.assert_close(dynamic_conv2d(x, weight, attention, bias, groups=2, strategy="benchmark"), out)
    assert calls == [chosen]
    with torch.no_grad():
        dynamic_conv2d(x, weight, attention, bias, groups=2, strategy="benchmark")
    assert len(strategies._BENCHMARKED) == 2  # forward only is another measurement


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_unbatched_input_is_one_sample(dims: int) -> None:
    case = next(c for c in CASES if c.dims == dims and c.B > 1)
    x, weight, attention, bias = make_tensors(case, seed=3)
    out = CORE[dims](x[1], weight, attention[1], bias, **conv_kwargs(case))
    torch.testing.assert_close(out, CORE[dims](x[1:2], weight, attention[1:2], bias, **conv_kwargs(case))[0])


@pytest.mark.parametrize("strategy", CPU_STRATEGIES)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_empty_batch_gives_an_empty_output_and_zero_gradients(dims: int, strategy: str) -> None:
    """As F.conv2d: B = 0 is no error; the bank's gradient is zero."""
    runs_in(strategy, dims)
    x = torch.randn(0, 4, *(6,) * dims, requires_grad=True)
    weight = torch.randn(3, 6, 2, *(3,) * dims, requires_grad=True)
    bias = torch.randn(3, 6, requires_grad=True)
    out = CORE[dims](x, weight, torch.randn(0, 3), bias, groups=2, strategy=strategy)
    assert out.shape == (0, 6, *(4,) * dims)
    out.sum().backward()
    assert x.grad.shape == x.shape and not weight.grad.any() and not bias.grad.any()


def test_numpy_integers_are_ints() -> None:
    np = pytest.importorskip("numpy")
    args = valid_args()
    out = dynamic_conv2d(**{**args, "stride": np.int64(2), "padding": (np.int32(1), 1), "groups": np.int64(2)})
    torch.testing.assert_close(out, dynamic_conv2d(**{**args, "stride": 2, "padding": 1}))


def valid_args() -> dict[str, Any]:
    """Arguments that dynamic_conv2d accepts: B=2, C=4, O=6, K=3, groups=2."""
    gen = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, 4, 6, 6, generator=gen),
        "weight": torch.randn(3, 6, 2, 3, 3, generator=gen),
        "attention": torch.softmax(torch.randn(2, 3, generator=gen), dim=1),
        "bias": torch.randn(3, 6, generator=gen),
        "groups": 2,
    }


def test_valid_args_are_valid() -> None:
    """The base of the error cases below runs, so each error comes from the one change."""
    assert dynamic_conv2d(**valid_args()).shape == (2, 6, 4, 4)


# name: (change to valid_args(), error type, regex of our message)
BAD_ARGS: dict[str, Tuple[dict[str, Any], type, str]] = {
    "2-D input": ({"x": torch.randn(4, 6)}, ValueError, r"x must be 4-D \[B, C, H, W\] or 3-D \[C, H, W\], got 2-D"),
    "unbatched x, [B, K] attention": (
        {"x": torch.randn(4, 6, 6)},
        ValueError,
        r"for unbatched x \[C, H, W\] attention must be 1-D \[K\], got shape \(2, 3\)",
    ),
    "unknown strategy": ({"strategy": "fast"}, ValueError, r"strategy must be one of \('auto', .*\), got 'fast'"),
    "4-D weight": (
        {"weight": torch.randn(6, 2, 3, 3)},
        ValueError,
        r"weight must be 5-D \[K, O, C/groups, kH, kW\], got 4-D",
    ),
    "channel mismatch": ({"x": torch.randn(2, 5, 6, 6)}, ValueError, r"x has C=5 channels .* expects C = 2 \* 2 = 4"),
    "groups not dividing O": (
        {"weight": torch.randn(3, 5, 2, 3, 3), "bias": None},
        ValueError,
        r"groups=2 must divide out_channels=5",
    ),
    "groups 0": ({"groups": 0}, ValueError, r"groups must be a positive int, got 0"),
    "groups float": ({"groups": 2.0}, ValueError, r"groups must be a positive int, got 2\.0"),
    "K = 0": (
        {"weight": torch.randn(0, 6, 2, 3, 3), "attention": torch.randn(2, 0), "bias": None},
        ValueError,
        r"weight holds K=0 kernels; need K >= 1",
    ),
    "attention [B, K+1]": (
        {"attention": torch.randn(2, 4)},
        ValueError,
        r"attention must have shape \[B, K\] = \[2, 3\], got \(2, 4\)",
    ),
    "attention [K]": (
        {"attention": torch.randn(3)},
        ValueError,
        r"attention must have shape \[B, K\] = \[2, 3\], got \(3,\)",
    ),
    "attention [B+1, K]": (
        {"attention": torch.randn(3, 3)},
        ValueError,
        r"attention must have shape \[B, K\] = \[2, 3\], got \(3, 3\)",
    ),
    "bias [O]": ({"bias": torch.randn(6)}, ValueError, r"bias must have shape \[K, O\] = \[3, 6\], got \(6,\)"),
    "bias [K, O+1]": (
        {"bias": torch.randn(3, 7)},
        ValueError,
        r"bias must have shape \[K, O\] = \[3, 6\], got \(3, 7\)",
    ),
    "float64 weight": (
        {"weight": torch.randn(3, 6, 2, 3, 3, dtype=torch.float64)},
        TypeError,
        r"weight has dtype torch.float64 but x has dtype torch.float32",
    ),
    "float64 attention": (
        {"attention": torch.rand(2, 3, dtype=torch.float64)},
        TypeError,
        r"attention has dtype torch.float64 but x has dtype torch.float32",
    ),
    "float64 bias": (
        {"bias": torch.randn(3, 6, dtype=torch.float64)},
        TypeError,
        r"bias has dtype torch.float64 but x has dtype torch.float32",
    ),
    "int x": (
        {"x": torch.ones(2, 4, 6, 6, dtype=torch.int64)},
        TypeError,
        r"x must be a floating point tensor, got dtype torch.int64",
    ),
    "int weight": (
        {"weight": torch.ones(3, 6, 2, 3, 3, dtype=torch.int32)},
        TypeError,
        r"weight must be a floating point tensor, got dtype torch.int32",
    ),
    "same with stride 2": (
        {"padding": "same", "stride": 2},
        ValueError,
        r"padding='same' needs stride=1 .*got stride=2",
    ),
    "bad padding string": (
        {"padding": "full"},
        ValueError,
        r"padding must be 'same', 'valid', an int or a pair of ints, got 'full'",
    ),
    "negative padding": ({"padding": -1}, ValueError, r"padding must be >= 0, got -1"),
    "negative padding pair": ({"padding": (1, -2)}, ValueError, r"padding must be >= 0, got \(1, -2\)"),
    "stride 0": ({"stride": 0}, ValueError, r"stride must be >= 1, got 0"),
    "stride float": ({"stride": 1.5}, ValueError, r"stride must be an int or a pair of ints, got 1\.5"),
    "stride triple": ({"stride": (1, 1, 1)}, ValueError, r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    "dilation 0": ({"dilation": (1, 0)}, ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    "kernel larger than input": (
        {"dilation": 3},
        ValueError,
        r"output size \(H', W'\) = \(0, 0\) < 1: the kernel \(3, 3\) with dilation=\(3, 3\) does not fit the input "
        r"\(6, 6\) padded by \(0, 0\)",
    ),
}


@pytest.mark.parametrize("change, error, message", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_arguments_raise_our_error(change: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        dynamic_conv2d(**{**valid_args(), **change})


# Bad arguments equal, as dictionary keys, to valid ones (2.0 == 2, True == 1), or tensors that differ
# from valid ones only in dtype or batch.
LIKE_VALID: dict[str, Tuple[dict[str, Any], type]] = {
    "groups 2.0": ({"groups": 2.0}, ValueError),
    "stride True": ({"stride": True}, ValueError),
    "padding (1.0, 1)": ({"padding": (1.0, 1)}, ValueError),
    "float64 x": ({"x": valid_args()["x"].double()}, TypeError),
    "attention of another batch": ({"attention": valid_args()["attention"][:1]}, ValueError),
}


@pytest.mark.parametrize("change, error", LIKE_VALID.values(), ids=LIKE_VALID.keys())
def test_checks_are_not_skipped_for_a_call_like_a_valid_one(change: dict[str, Any], error: type) -> None:
    """A call with the shapes, dtypes, devices and arguments of an earlier one reuses its checked
    plan; one that differs from it in any of them, however little, is checked afresh."""
    args = {**valid_args(), "stride": 1, "padding": (1, 1)}
    dynamic_conv2d(**args)
    with pytest.raises(error):
        dynamic_conv2d(**{**args, **change})


@pytest.mark.parametrize("strategy, choices", [("auto", 1), ("benchmark", 2)])
def test_a_call_like_an_earlier_one_skips_the_checks(monkeypatch: pytest.MonkeyPatch, strategy: str,
                                                     choices: int) -> None:
    """The second of two like calls neither checks its arguments again nor, unless it times the
    strategies (whose choice depends on the thread count too), chooses its strategy again."""
    counts = {"_check": 0, "_strategy": 0}
    for name in counts:
        real = getattr(functional, name)

        def counted(*args: Any, real: Callable[..., Any] = real, name: str = name) -> Any:
            counts[name] += 1
            return real(*args)

        monkeypatch.setattr(functional, name, counted)
    monkeypatch.setattr(functional, "_PLANS", {})
    args = valid_args()
    for _ in range(2):
        dynamic_conv2d(**args, strategy=strategy)
    assert counts == {"_check": 1, "_strategy": choices}
    dynamic_conv2d(**{**args, "stride": 2}, strategy=strategy)
    assert counts["_check"] == 2


def test_remembered_plans_are_bounded() -> None:
    weight, attention = torch.randn(2, 2, 2, 1), torch.randn(1, 2)
    for length in range(1, 1 + 2 * functional._MAX_PLANS):  # as many input shapes
        dynamic_conv1d(torch.randn(1, 2, length), weight, attention)
    assert 0 < len(functional._PLANS) <= functional._MAX_PLANS


# The same checks speak each dimension's language: (function, change, regex).
BAD_ARGS_1D_3D = {
    "1-D core, 4-D input": (dynamic_conv1d, {"x": torch.randn(2, 4, 6, 6)},
                            r"x must be 3-D \[B, C, L\] or 2-D \[C, L\], got 4-D"),
    "1-D core, 5-D bank": (dynamic_conv1d, {"x": torch.randn(2, 4, 6)},
                           r"weight must be 4-D \[K, O, C/groups, kL\], got 5-D"),
    "3-D core, 3-D input": (dynamic_conv3d, {"x": torch.randn(4, 6, 6)},
                            r"x must be 5-D \[B, C, D, H, W\] or 4-D \[C, D, H, W\], got 3-D"),
    "3-D core, stride pair": (dynamic_conv3d, {"x": torch.randn(2, 4, 6, 6, 6), "stride": (1, 2)},
                              r"weight must be 6-D \[K, O, C/groups, kD, kH, kW\], got 5-D"),
    "1-D core, stride pair": (dynamic_conv1d, {"x": torch.randn(2, 4, 6), "weight": torch.randn(3, 6, 2, 3),
                                               "stride": (1, 2)},
                              r"stride must be an int or a tuple of one int, got \(1, 2\)"),
    "3-D core, too small": (dynamic_conv3d, {"x": torch.randn(2, 4, 6, 6, 2), "weight": torch.randn(3, 6, 2, 3, 3, 3)},
                            r"output size \(D', H', W'\) = \(4, 4, 0\) < 1"),
}


@pytest.mark.parametrize("fn, change, message", BAD_ARGS_1D_3D.values(), ids=BAD_ARGS_1D_3D.keys())
def test_bad_arguments_in_1d_and_3d(fn: Callable[..., Tensor], change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fn(**{**valid_args(), **change})


@pytest.mark.skipif("fused" not in strategies.STRATEGIES, reason="triton is not installed")
def test_fused_strategy_is_2d_only() -> None:
    with pytest.raises(ValueError, match=r"strategy 'fused' runs 2-D convolutions only, not 1-D"):
        dynamic_conv1d(torch.randn(2, 4, 6), torch.randn(3, 6, 4, 3), torch.randn(2, 3), strategy="fused")


@pytest.mark.parametrize("name", ["x", "weight", "attention", "bias"])
def test_device_mismatch(name: str) -> None:
    """A tensor on another device ('meta' stands in for a GPU) is named in the error."""
    args = valid_args()
    args[name] = args[name].to("meta")
    # Tensors are compared with x, so when x moves the first other tensor is named.
    if name == "x":
        expected = "weight is on device cpu but x is on meta"
    else:
        expected = f"{name} is on device meta but x is on cpu"
    with pytest.raises(ValueError, match=expected):
        dynamic_conv2d(**args)


@pytest.mark.parametrize("strategy", ["batch_as_groups", "per_sample"])
def test_flop_counter_counts_one_convolution_per_sample_and_the_mixing(strategy: str) -> None:
    """torch.utils.flop_counter counts the operations that run. Mixing first, the forward
    is a static convolution's multiply-adds plus the mixing [B, K] @ [K, O*C*k*k], and the
    backward two convolutions (input and weight gradients) and two products (back to the
    attention and to the bank). (torch 2.13's counter takes a grouped convolution's weight
    gradient as ``groups`` times its real cost, so batch-as-groups' backward, B*g groups,
    is checked through the per-sample loop's, one group each.)"""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    weight = torch.randn(3, 6, 4, 3, 3, requires_grad=True)
    attention = torch.randn(2, 3, requires_grad=True)
    mix = 2 * 2 * 3 * 6 * 4 * 3 * 3  # [B, K] @ [K, O*C*k*k]
    with FlopCounterMode(display=False) as dynamic:
        out = dynamic_conv2d(x, weight, attention, padding=1, strategy=strategy)
        forward = dynamic.get_total_flops()
        out.sum().backward()
    with FlopCounterMode(display=False) as static:
        F.conv2d(x, weight[0], padding=1).sum().backward()
    conv_forward = static.get_total_flops() // 3  # forward, input and weight gradients
    assert forward == conv_forward + mix
    if strategy == "per_sample":
        assert dynamic.get_total_flops() == 3 * conv_forward + 3 * mix


def test_flop_counter_sees_the_k_branch_sums_k_convolutions() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    x, weight, attention = torch.randn(2, 4, 5, 5), torch.randn(3, 6, 4, 3, 3), torch.randn(2, 3)
    with FlopCounterMode(display=False) as counter:
        dynamic_conv2d(x, weight, attention, padding=1, strategy="kernel_branches")
    conv = 2 * 2 * 6 * 4 * 9 * 25  # one static convolution of the batch
    assert 3 * conv <= counter.get_total_flops() <= 3 * conv + 2 * 2 * 3 * 6 * 25  # K convolutions, the mix


def test_compiled_operator_matches_the_plain_path() -> None:
    """``torch.ops.dyconv_teach.batch_as_groups_conv`` (what torch.compile runs) passes torch's
    operator checks (schema, fake tensors, autograd registration) and equals the eager path,
    in 1, 2 and 3 dimensions and on channels_last input."""
    for dims in (1, 2, 3):
        gen = torch.Generator().manual_seed(dims)
        x = torch.randn(3, 4, *(5,) * dims, generator=gen, dtype=torch.float64)
        if dims > 1:
            x = x.contiguous(memory_format=CHANNELS_LAST[dims])
        w = torch.randn(3, 6, 2, *(3,) * dims, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        args = (x.requires_grad_(), w, b, (1,) * dims, (1,) * dims, (1,) * dims, 2)
        torch.library.opcheck(torch.ops.dyconv_teach.batch_as_groups_conv, args)
        op = torch.ops.dyconv_teach.batch_as_groups_conv(*args)
        plain = strategies.batch_as_groups_conv(*args)  # in eager: the plain torch operations
        torch.testing.assert_close(op, plain)
        assert op.stride() == plain.stride()
        conv = args[3:]
        assert torch.autograd.gradcheck(
            lambda x, w, b, conv=conv: torch.ops.dyconv_teach.batch_as_groups_conv(x, w, b, *conv), args[:3])
