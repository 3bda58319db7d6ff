"""Tests of :mod:`dyconv_teach.bench`: its table of strategies, the timing and memory
helpers, the report and the command line, and the ResNet-18 it times. The strategies
themselves are tested in tests/test_functional.py. No test asserts a time.
"""

from __future__ import annotations

import pytest
import torch

from dyconv_teach import DynamicConv2d, bench
from dyconv_teach.functional import dynamic_conv2d
from dyconv_teach.reference import per_sample_conv
from dyconv_teach.strategies import STRATEGIES as CORE_STRATEGIES


def test_strategies_table_shares_the_signature() -> None:
    """Every entry of STRATEGIES runs with dynamic_conv2d's arguments; the dynamic ones
    agree with the per-sample loop, the static baseline has the same output shape."""
    args = bench.make_inputs(batch=3, channels=4, size=5, dtype=torch.float64)
    ref = per_sample_conv(*args, padding=1)
    assert list(bench.STRATEGIES)[:2] == [bench.BASELINE, bench.CORE] and set(CORE_STRATEGIES) <= set(bench.STRATEGIES)
    cpu = bench.strategies_for("cpu")
    assert set(bench.STRATEGIES) - set(cpu) == {n for n, s in CORE_STRATEGIES.items() if "cpu" not in s.devices}
    for name, fn in cpu.items():
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
    for name in list(bench.strategies_for("cpu"))[1:] + ["core/best other"]:
        assert name in header
    rows = [line.split() for line in lines if line.split()[:2] == ["8", "8x8"]]
    time_rows, memory_rows = rows[: len(bench.QUICK_BATCHES)], rows[len(bench.QUICK_BATCHES) :]
    assert [int(r[2]) for r in time_rows] == list(bench.QUICK_BATCHES)
    for r in time_rows:  # B, static ms, one ratio per non-baseline strategy, core/best other
        assert len(r) == 3 + 1 + len(bench.strategies_for("cpu")) - 1 + 1
        assert all(v.endswith("x") and float(v[:-1]) > 0 for v in r[4:])
    geomean = next(line for line in lines if line.split()[:1] == ["geomean"])
    assert len(geomean.split()) == 1 + len(bench.strategies_for("cpu")) - 1
    assert any(line.startswith("Target: geomean of dynamic_conv2d <= 1.25x") for line in lines)
    assert any(line.startswith("Target: no cell slower than the best other strategy") for line in lines)
    assert [int(r[2]) for r in memory_rows] == list(bench.QUICK_BATCHES)
    for r in memory_rows:  # B, weight MiB, one peak per strategy
        assert len(r) == 3 + 1 + len(bench.strategies_for("cpu"))


@pytest.mark.parametrize(
    "argv, message", [(["--threads", "0"], "--threads must be >= 1"), (["--repeats", "0"], "--repeats must be >= 1")]
)
def test_main_rejects_bad_options(argv: list, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad option values stop argparse with a message naming the value."""
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_format_report_verdicts() -> None:
    """The geometric mean and the slower-than-best-other check are computed from the
    times given: here 1.10x and 2.00x give a 1.48x geomean, and the second cell loses
    to the per-sample loop (2.00 / 1.50 = 1.33x); no memory table without peaks."""

    def row(B: int, core: float, loop: float) -> bench.Cell:
        seconds = {"static conv": 1.0, "dynamic_conv2d": core, "batch_as_groups": 3.0, "kernel_branches": 4.0,
                   "per-sample loop": loop}
        return bench.Cell(C=4, HW=5, B=B, seconds=seconds, weight_bytes=0)

    text = bench.format_report([row(1, 1.1, 1.5), row(32, 2.0, 1.5)])
    assert "Target: geomean of dynamic_conv2d <= 1.25x static conv: 1.48x, NOT met" in text
    assert "NOT met in C=4 5x5 B=32 (1.33x)" in text
    assert "B=1 " not in text and "Memory" not in text
    assert "geomean of dynamic_conv2d <= 1.25x static conv: 1.05x, met" in bench.format_report([row(1, 1.05, 1.5)])


def test_format_report_marks_strategies_not_run() -> None:
    """A strategy skipped in a cell (the per-sample loop past B = 32) shows '-' and has no geomean."""
    seconds = {"static conv": 1.0, "dynamic_conv2d": 1.2, "batch_as_groups": 1.2, "per-sample loop": 2.0}
    big = dict(seconds)
    del big["per-sample loop"]
    text = bench.format_report([bench.Cell(4, 5, 1, seconds, 0), bench.Cell(4, 5, 128, big, 0)])
    row = next(line for line in text.splitlines() if line.split()[:3] == ["4", "5x5", "128"])
    geomean = next(line for line in text.splitlines() if line.split()[:1] == ["geomean"])
    assert row.split()[-2] == "-" and geomean.split()[-1] == "-"


def test_resnet18_has_torchvisions_shapes() -> None:
    """11.69 M parameters as torchvision's ResNet-18; the dynamic one replaces the 16 3x3
    convolutions of its blocks (K = 4 banks) and keeps the 7x7 stem."""
    static, dynamic = bench.resnet18(), bench.resnet18(dynamic=True)
    assert sum(p.numel() for p in static.parameters()) == 11_689_512
    assert sum(isinstance(m, DynamicConv2d) for m in dynamic.modules()) == 16
    x = torch.randn(2, 3, 32, 32)
    assert static(x).shape == dynamic(x).shape == (2, 1000)


def test_time_train_step_runs_on_the_cpu() -> None:
    model = bench.resnet18(dynamic=True, num_classes=1000)
    weight = model[4].conv1.weight.detach().clone()
    assert bench.time_train_step(model, batch=2, image_size=32, repeats=1, device="cpu") > 0
    assert not torch.equal(model[4].conv1.weight, weight), "the SGD step updated the dynamic layers"
