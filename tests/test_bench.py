"""Tests of :mod:`dyconv_teach.bench`, and of the two strategies ``dynamic_conv2d``
keeps (batch-as-groups, K-branch sum). The dispatcher picks the K-branch sum only
for mixed weights over 32 MiB, so each strategy is forced here (through the
benchmark's table) and compared with the per-sample loop, values and gradients;
the dispatch rule is tested with its size threshold lowered. No test asserts a time.
"""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck

from dyconv_teach import bench
from dyconv_teach import functional
from dyconv_teach.functional import dynamic_conv2d
from dyconv_teach.reference import per_sample_conv2d

# B = 1 is a plain convolution with the mixed kernel; B = 5 folds 5 samples into groups.
BATCHES = {"B1": 1, "B5": 5}
KEPT = ["batch-as-groups", "K-branch sum"]

# (groups, C, O, kernel (kH, kW), stride, padding, dilation, channels_last)
CONFIGS = [
    (1, 3, 4, (3, 3), 1, 1, 1, False),
    (2, 4, 6, (3, 2), (2, 1), 1, (1, 2), True),
    (3, 3, 3, (3, 3), 1, "same", 2, False),
    (2, 4, 4, (1, 3), 2, "valid", 1, True),
]


def _inputs(batch: int, groups: int, C: int, O: int, kernel: Tuple[int, int], channels_last: bool, seed: int = 0):
    """float64 leaves ``(x, weight, attention, bias)`` requiring grad, K = 3, 7x6 input."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, 7, 6, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(3, O, C // groups, *kernel, generator=gen, dtype=torch.float64)
    attention = torch.softmax(torch.randn(batch, 3, generator=gen, dtype=torch.float64), dim=1)
    bias = torch.randn(3, O, generator=gen, dtype=torch.float64)
    return tuple(t.requires_grad_() for t in (x, weight, attention, bias))


@pytest.mark.parametrize("strategy", KEPT)
@pytest.mark.parametrize("batch", BATCHES.values(), ids=list(BATCHES))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"g{c[0]}-k{c[3]}-s{c[4]}-p{c[5]}-d{c[6]}-cl{int(c[7])}")
def test_strategy_matches_per_sample_loop(strategy: str, batch: int, config: tuple) -> None:
    """Output and all four gradients equal the per-sample loop's to float64 rounding."""
    groups, C, O, kernel, stride, padding, dilation, channels_last = config
    args = _inputs(batch, groups, C, O, kernel, channels_last)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    out = bench.STRATEGIES[strategy](*args, **conv)
    grads = torch.autograd.grad(out, args, torch.ones_like(out))
    ref = per_sample_conv2d(*args, **conv)
    ref_grads = torch.autograd.grad(ref, args, torch.ones_like(ref))
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-12
    for name, g, r in zip(("x", "weight", "attention", "bias"), grads, ref_grads):
        assert (g - r).abs().max().item() < 1e-11, name


@pytest.mark.parametrize("strategy", KEPT)
@pytest.mark.parametrize("batch", [1, 3])
def test_strategy_gradcheck(strategy: str, batch: int) -> None:
    """Finite differences agree with autograd in x, weight, attention and bias (float64)."""
    gen = torch.Generator().manual_seed(1)
    # Small, since gradcheck perturbs every input element: C = O = g = 2, 4x3 input, 3x2 kernel.
    x = torch.randn(batch, 2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 1, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    attention = torch.rand(batch, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 2, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(x: Tensor, weight: Tensor, attention: Tensor, bias: Tensor) -> Tensor:
        return bench.STRATEGIES[strategy](x, weight, attention, bias, stride=(2, 1), padding=1, dilation=(1, 2), groups=2)

    assert gradcheck(fn, (x, weight, attention, bias))


def test_dispatch_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The K-branch sum runs only for mixed weights over the size threshold and
    (K - 1) * H' * W' <= 256; batch-as-groups otherwise. The threshold is lowered to
    0 bytes here so that small tensors can cross it."""
    calls = []
    original = functional._kernel_branches

    def spy(*args: object) -> Tensor:
        calls.append(args[0].shape)  # type: ignore[attr-defined]
        return original(*args)

    monkeypatch.setattr(functional, "_kernel_branches", spy)
    small = _inputs(2, 1, 3, 4, (3, 3), False)  # 7x6 input, padding 1: H'W' = 42, (K-1)H'W' = 84
    dynamic_conv2d(*small, padding=1)
    assert calls == []  # 2 * 4*3*3*3 * 8 bytes: far under 32 MiB
    monkeypatch.setattr(functional, "_BIG_MIXED_WEIGHT_BYTES", 0)
    out = dynamic_conv2d(*small, padding=1)
    assert calls == [small[0].shape]
    assert (out - per_sample_conv2d(*small, padding=1)).abs().max().item() < 1e-12
    big_output = _inputs(2, 1, 3, 4, (1, 1), False)  # 1x1 kernel on the 7x6 input
    dynamic_conv2d(*big_output, padding=3)  # H'W' = 13 * 12 = 156, (K-1)H'W' = 312 > 256
    assert len(calls) == 1


def test_strategies_table_shares_the_signature() -> None:
    """Every entry of STRATEGIES runs with dynamic_conv2d's arguments; the dynamic ones
    agree with the per-sample loop, the static baseline has the same output shape."""
    args = bench.make_inputs(batch=3, channels=4, size=5, dtype=torch.float64)
    ref = per_sample_conv2d(*args, padding=1)
    assert list(bench.STRATEGIES)[:2] == [bench.BASELINE, bench.CORE] and set(KEPT) <= set(bench.STRATEGIES)
    for name, fn in bench.STRATEGIES.items():
        out = fn(*args, padding=1)
        assert out.shape == ref.shape, name
        if name != bench.BASELINE:
            assert (out - ref).abs().max().item() < 1e-12, name


def test_per_sample_weight_bytes() -> None:
    """B * O * C/g * kH * kW elements times the element size."""
    assert bench.per_sample_weight_bytes(32, 256, 256) == 32 * 256 * 256 * 9 * 4
    assert bench.per_sample_weight_bytes(2, 6, 4, (3, 1), groups=2, dtype=torch.float64) == 2 * 6 * 2 * 3 * 8


def test_time_and_memory_helpers() -> None:
    """The timer returns a positive number of seconds and rejects repeats < 1; the
    measured peak holds at least the per-sample weight the trick builds."""
    args = bench.make_inputs(batch=4, channels=8, size=6)
    assert bench.time_forward_backward(bench.static_conv2d, *args, repeats=2, padding=1) > 0
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        bench.time_forward_backward(bench.static_conv2d, *args, repeats=0)
    peak = bench.peak_memory_forward_backward(dynamic_conv2d, *args, padding=1)
    assert peak >= bench.per_sample_weight_bytes(4, 8, 8)


def test_main_quick_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    """``--quick`` prints the header, one row per cell with a ratio per strategy,
    the geometric means, the target verdicts and the memory table."""
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets it for the whole process
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("machine: ")
    assert lines[1].startswith(f"torch {torch.__version__}, 1 threads")
    header = next(line for line in lines if line.lstrip().startswith("C=O") and "static ms" in line)
    for name in list(bench.STRATEGIES)[1:] + ["core/best other"]:
        assert name in header
    rows = [line.split() for line in lines if line.split()[:2] == ["8", "8x8"]]
    time_rows, memory_rows = rows[: len(bench.QUICK_BATCHES)], rows[len(bench.QUICK_BATCHES) :]
    assert [int(r[2]) for r in time_rows] == list(bench.QUICK_BATCHES)
    for r in time_rows:  # B, static ms, one ratio per non-baseline strategy, core/best other
        assert len(r) == 3 + 1 + len(bench.STRATEGIES) - 1 + 1
        assert all(v.endswith("x") and float(v[:-1]) > 0 for v in r[4:])
    geomean = next(line for line in lines if line.split()[:1] == ["geomean"])
    assert len(geomean.split()) == 1 + len(bench.STRATEGIES) - 1
    assert any(line.startswith("Target: geomean of dynamic_conv2d <= 1.25x") for line in lines)
    assert any(line.startswith("Target: no cell slower than the best other strategy") for line in lines)
    assert [int(r[2]) for r in memory_rows] == list(bench.QUICK_BATCHES)
    for r in memory_rows:  # B, weight MiB, one peak per strategy
        assert len(r) == 3 + 1 + len(bench.STRATEGIES)


@pytest.mark.parametrize("argv, message", [(["--threads", "0"], "--threads must be >= 1"), (["--repeats", "0"], "--repeats must be >= 1")])
def test_main_rejects_bad_options(argv: list, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad option values stop argparse with a message naming the value."""
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_format_report_verdicts() -> None:
    """The geometric mean and the slower-than-best-other check are computed from the
    times given: here 1.10x and 2.00x give a 1.48x geomean, and the second cell loses
    to the per-sample loop (2.00 / 1.50 = 1.33x); no memory table without peaks."""

    def row(B: int, core: float, loop: float) -> dict:
        seconds = {"static conv": 1.0, "dynamic_conv2d": core, "batch-as-groups": 3.0, "K-branch sum": 4.0, "per-sample loop": loop}
        return {"C": 4, "HW": 5, "B": B, "seconds": seconds, "peak_bytes": {}, "weight_bytes": 0}

    text = bench.format_report([row(1, 1.1, 1.5), row(32, 2.0, 1.5)])
    assert "Target: geomean of dynamic_conv2d <= 1.25x static conv: 1.48x, NOT met" in text
    assert "NOT met in C=4 5x5 B=32 (1.33x)" in text
    assert "B=1 " not in text and "Memory" not in text
    assert "geomean of dynamic_conv2d <= 1.25x static conv: 1.05x, met" in bench.format_report([row(1, 1.05, 1.5)])
