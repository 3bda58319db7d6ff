"""The fused strategy's C kernels (dyconv_teach/kernels/cpu_conv.c): exact against batch-as-groups
on shapes that cross every tile edge, the same bits on any number of threads, chosen by the rule
only where nothing watches the call, and clear errors where they cannot run."""

from typing import Any, List

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dyconv_teach import dynamic_conv2d, strategies
from dyconv_teach.kernels import cpu_conv

pytestmark = pytest.mark.skipif(cpu_conv.compiler() is None, reason="no C compiler")

# B, C, O, K, groups, kernel, size, conv: the tiles are 256 reduction rows x 64 columns (output,
# input gradient) and 128 x 128 (weight gradient), 8 output pixels and 2 vectors at a time.
SHAPES = [
    (3, 64, 160, 3, 1, (3, 3), (9, 7), {"padding": 1}),  # R = 576 > 256, O = 160 crosses 64 and 128
    (5, 12, 18, 2, 3, (3, 3), (7, 7), {"stride": 2, "padding": 1}),  # 6 channels a group: tails only
    (2, 6, 70, 3, 2, (5, 5), (9, 8), {"padding": (2, 1), "dilation": 2}),
    (4, 33, 20, 4, 1, (1, 1), (4, 5), {}),  # R = 33: one full tile of 32 and a tail
    (2, 8, 8, 2, 1, (2, 3), (10, 10), {"stride": (3, 2), "padding": (0, 2), "dilation": (2, 1)}),
]


def tensors(B: int, C: int, O: int, K: int, groups: int, kernel: Any, size: Any, dtype: torch.dtype,
            seed: int = 0) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, *size, generator=gen, dtype=dtype)
    weight = torch.randn(K, O, C // groups, *kernel, generator=gen, dtype=dtype)
    attention = torch.softmax(torch.randn(B, K, generator=gen, dtype=dtype), dim=1)
    bias = torch.randn(K, O, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, weight, attention, bias)]


def forward_backward(strategy: str, args: List[torch.Tensor], groups: int, conv: dict) -> List[torch.Tensor]:
    out = dynamic_conv2d(*args, groups=groups, **conv, strategy=strategy)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return [out, *torch.autograd.grad(out, args, grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, C, O, K, groups, kernel, size, conv", SHAPES)
def test_fused_matches_batch_as_groups(B: int, C: int, O: int, K: int, groups: int, kernel: Any, size: Any,
                                       conv: dict, dtype: torch.dtype) -> None:
    args = tensors(B, C, O, K, groups, kernel, size, dtype)
    fused = forward_backward("fused", args, groups, conv)
    expected = forward_backward("batch_as_groups", args, groups, conv)
    names = ["out", "x", "weight", "attention", "bias"]
    for name, got, want in zip(names, fused, expected):
        assert got.shape == want.shape and got.dtype == dtype, name
        tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
        torch.testing.assert_close(got, want, **tol, msg=name)
    x_cl = args[0].detach().contiguous(memory_format=torch.channels_last)
    out = dynamic_conv2d(x_cl, *args[1:], groups=groups, **conv, strategy="fused")
    assert out.is_contiguous(memory_format=torch.channels_last)  # as F.conv2d keeps it
    torch.testing.assert_close(out, fused[0], rtol=0, atol=0)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_builds_for_other_instruction_sets_agree(capability: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``ATEN_CPU_CAPABILITY`` sends torch's kernels to the baseline or AVX2 instruction sets,
    the C kernels are built for them too (narrower vectors, fewer rows a tile), and agree."""
    args = tensors(*SHAPES[1][:7], torch.float64)
    expected = forward_backward("batch_as_groups", args, 3, SHAPES[1][7])
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    cpu_conv.library.cache_clear()
    try:
        built = forward_backward("fused", args, 3, SHAPES[1][7])
    finally:
        cpu_conv.library.cache_clear()  # the next call builds for the environment as monkeypatch restores it
    for got, want in zip(built, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_same_bits_on_any_number_of_threads() -> None:
    args = tensors(*SHAPES[0][:7], torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = forward_backward("fused", args, 1, {"padding": 1})
        torch.set_num_threads(3)
        three = forward_backward("fused", args, 1, {"padding": 1})
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_the_rule_picks_the_fused_kernels_where_nothing_watches(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the rule runs the fused kernels where it would run the K-branch sum (a deep layer,
    large batch), and the K-branch sum where a FLOP counter or a ``torch.func`` transform watches."""
    weight = torch.empty(4, 256, 256, 3, 3)
    assert strategies.choose("cpu", 32, weight, (7, 7), fused=True) == "fused"
    assert strategies.choose("cpu", 32, weight, (7, 7)) == "kernel_branches"
    assert strategies.choose("cuda", 32, weight, (7, 7), fused=True) == "kernel_branches"
    assert strategies.choose("cpu", 1, weight, (7, 7), fused=True) == "batch_as_groups"
    ran: List[str] = []
    for name, strategy in list(strategies.STRATEGIES.items()):

        def record(run: Any, name: str = name) -> Any:
            return lambda *args: (ran.append(name), run(*args))[1]

        monkeypatch.setitem(strategies.STRATEGIES, name, strategy._replace(run=record(strategy.run)))
    x, attention = torch.randn(32, 256, 7, 7), torch.softmax(torch.randn(32, 4), 1)
    weight = torch.randn(4, 256, 256, 3, 3) / 48
    out = dynamic_conv2d(x, weight, attention, padding=1)
    with FlopCounterMode(display=False) as counter:
        counted = dynamic_conv2d(x, weight, attention, padding=1)
    assert ran == ["fused", "kernel_branches"] and counter.get_total_flops() > 0
    torch.testing.assert_close(out, counted, rtol=1e-4, atol=1e-4)
    ran.clear()
    torch.func.grad(lambda a: dynamic_conv2d(x, weight, a, padding=1).sum())(attention)
    assert ran == ["kernel_branches"]
    assert not strategies.runs("fused", x.bfloat16()) and strategies.runs("fused", x.double())


def test_bad_dtypes_and_a_failed_build_say_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    args = [t.detach().bfloat16() for t in tensors(2, 4, 4, 2, 1, (3, 3), (5, 5), torch.float32)]
    with pytest.raises(TypeError, match=r"float32 or float64.*torch.bfloat16 on cpu"):
        dynamic_conv2d(*args, padding=1, strategy="fused")
    with pytest.raises(TypeError, match="float32 or float64 tensors, got torch.float16"):
        cpu_conv.library(torch.float16)
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("DYCONV_TEACH_CACHE", str(tmp_path))
    cpu_conv.library.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="could not compile cpu_conv.c with .*false"):
            cpu_conv.library(torch.float32)
    finally:
        cpu_conv.library.cache_clear()
