"""Tests of :mod:`dyconv_teach.bench`: its table of strategies, the timing and memory
helpers, the report and the command line, and the ResNet-18 it times. The strategies
themselves are tested in tests/test_functional.py. No test asserts a time.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
import torch

from dyconv_teach import DynamicConv2d, bench
from dyconv_teach.functional import dynamic_conv2d
from dyconv_teach.reference import per_sample_conv
from dyconv_teach.strategies import STRATEGIES as CORE_STRATEGIES
from dyconv_teach.strategies import mixed_weight_bytes


def test_strategies_table_shares_the_signature() -> None:
    """Every entry of STRATEGIES runs with dynamic_conv2d's arguments; the dynamic ones (the core,
    its strategies, the peers) agree with the per-sample loop, the static baseline has the same
    output shape."""
    args = bench.make_inputs(batch=3, channels=4, size=5, dtype=torch.float64)
    ref = per_sample_conv(*args, padding=1)
    assert list(bench.STRATEGIES)[:2] == [bench.BASELINE, bench.CORE]
    assert set(CORE_STRATEGIES) | set(bench.PEERS) <= set(bench.STRATEGIES)
    cpu = bench.strategies_for("cpu")
    assert set(bench.STRATEGIES) - set(cpu) == {n for n, s in CORE_STRATEGIES.items() if "cpu" not in s.devices}
    for name, fn in cpu.items():
        out = fn(*args, padding=1)
        assert out.shape == ref.shape, name
        if name != bench.BASELINE:
            assert (out - ref).abs().max().item() < 1e-12, name
    # The peers also take no bias, a stride and groups.
    x, weight, attention, _ = args
    grouped = weight[:, :, :2].detach()
    expected = per_sample_conv(x, grouped, attention, stride=2, groups=2)
    for name, fn in bench.PEERS.items():
        torch.testing.assert_close(fn(x, grouped, attention, None, stride=2, groups=2), expected, msg=name)


def test_static_baseline_is_a_layer_of_its_own() -> None:
    """The baseline computes F.conv2d with the bank's first kernel and bias, and its backward gives
    the input a gradient but writes none into the bank: a static layer has one kernel, and a
    zero-filled gradient of all K kernels (what indexing the bank costs) is not its cost."""
    x, weight, attention, bias = bench.make_inputs(batch=2, channels=4, size=5, dtype=torch.float64)
    out = bench.static_conv2d(x, weight, attention, bias, padding=1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight[0], bias[0], padding=1))
    out.sum().backward()
    assert x.grad is not None and weight.grad is None and bias.grad is None and attention.grad is None


def test_time_rounds_balances_who_runs_after_whom() -> None:
    """Each round runs every entry once, in the orders of a Williams design: over one design every
    entry runs right after every other one equally often (the call after another pays, or
    profits, from what that one left behind), for an even and an odd number of entries."""
    order: list = []

    def entry(name: str) -> Any:
        return lambda x, **conv: (order.append(name), x.sum())[1]

    for names in ("abcd", "abc"):
        order.clear()
        fns = {name: entry(name) for name in names}
        times = bench.time_rounds(fns, [torch.ones(2, requires_grad=True)])
        rounds = len(names) * (1 if len(names) % 2 == 0 else 2)  # one whole design by default
        assert {n: len(t) for n, t in times.items()} == {n: rounds for n in names}
        n = len(names)
        timed = [order[n * (r + 1) : n * (r + 2)] for r in range(rounds)]  # after the warm-up pass of each
        follows = Counter(pair for run in timed for pair in zip(run, run[1:]))
        assert len(follows) == len(names) * (len(names) - 1) and len(set(follows.values())) == 1, follows
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        bench.time_rounds(fns, [torch.ones(2)], rounds=0)


def test_time_rounds_fills_its_seconds_with_whole_designs() -> None:
    """Without ``rounds``, whole designs run one after another until ``seconds`` have passed."""

    def entry(x: torch.Tensor, **conv: Any) -> torch.Tensor:
        time.sleep(0.002)
        return x.sum()

    fns = {name: entry for name in "abc"}  # a design: 6 rounds of 3 entries, some 36 ms
    times = bench.time_rounds(fns, [torch.ones(2, requires_grad=True)], seconds=0.1)
    rounds = {len(t) for t in times.values()}
    assert len(rounds) == 1
    assert rounds.pop() in (18, 24)  # past 0.1 s after three designs (four on a slow sleep)


def test_time_and_memory_helpers() -> None:
    """The timer returns a positive number of seconds; the measured peak holds at least the
    per-sample weight the trick builds."""
    args = bench.make_inputs(batch=4, channels=8, size=6)
    assert bench.time_forward_backward(bench.static_conv2d, *args, rounds=2, padding=1) > 0
    peak = bench.peak_memory_forward_backward(dynamic_conv2d, *args, padding=1)
    assert peak >= mixed_weight_bytes(4, args[1])


def test_machine_description_names_the_variables_that_change_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stored run says which kernels and allocator settings it ran under, and only those set."""
    for name in bench.TIMING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "set:" not in bench.machine_description()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
    last = bench.machine_description().splitlines()[-1]
    assert last == "set: ONEDNN_MAX_CPU_ISA=SSE41 GLIBC_TUNABLES=glibc.malloc.mmap_max=0"


def test_main_quick_prints_the_tables(capsys: pytest.CaptureFixture[str]) -> None:
    """``--quick`` prints the header, one row per cell with a ratio and spread per entry and the
    core over the best peer, the geometric means, the cells where the core is behind, and the
    memory table."""
    threads = torch.get_num_threads()
    try:
        bench.main(["--quick", "--rounds", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets it for the whole process
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("machine: ")
    assert lines[1].startswith(f"torch {torch.__version__}, 1 threads")
    entries = list(bench.strategies_for("cpu"))[1:]
    ours = [n for n in entries if n not in bench.PEERS]
    peers = [n for n in entries if n in bench.PEERS]
    headers = [line.split() for line in lines if line.lstrip().startswith("C=O")]
    # The core's time table, the peers' time table, then the memory table in two halves.
    assert headers[0][3:] == ["static", "ms"] + [bench._SHORT[n] for n in ours]
    assert headers[1][3:] == [bench._SHORT[n] for n in peers] + ["core/peer"]
    memory = [bench.BASELINE, *entries]
    assert headers[2][3:] + headers[3][3:] == ["weight"] + [bench._SHORT[n] for n in memory]
    rows = [line.split() for line in lines if line.split()[:2] == ["8", "8x8"]]
    n = len(bench.QUICK_BATCHES)
    assert len(rows) == 4 * n and [int(r[2]) for r in rows] == list(bench.QUICK_BATCHES) * 4
    for r in rows[:n]:  # B, static ms, a median+-spread per entry of the core
        assert len(r) == 4 + len(ours) and float(r[3]) > 0
        assert all(float(v.split("+-")[0]) > 0 and v.split("+-")[1].isdigit() for v in r[4:])
    for r in rows[n : 2 * n]:  # a median+-spread per peer, then core/peer
        assert len(r) == 3 + len(peers) + 1 and float(r[-1]) > 0
        assert all(float(v.split("+-")[0]) > 0 and v.split("+-")[1].isdigit() for v in r[3:-1])
    geomeans = [line.split() for line in lines if line.split()[:1] == ["geomean"]]
    assert [len(g) - 1 for g in geomeans] == [len(ours), len(peers)]
    assert any(line.startswith("Geomean of the core ") for line in lines)
    assert any(line.startswith("Cells where the core is more than 10% slower than the best peer:") for line in lines)
    for r in rows[2 * n : 3 * n]:  # weight MiB, one peak per entry of the first half
        assert len(r) == 3 + 1 + len(headers[2]) - 4
    assert all(len(r) == len(headers[3]) for r in rows[3 * n :])


@pytest.mark.parametrize(
    "argv, message",
    [(["--threads", "0"], "--threads must be >= 1"), (["--rounds", "0"], "--rounds must be >= 1"),
     (["--seconds", "-1"], "--seconds must be >= 0")],
)
def test_main_rejects_bad_options(argv: list, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad option values stop argparse with a message naming the value."""
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err


def test_cell_medians_spread_and_best_peer() -> None:
    """Ratios are taken round by round against the static conv (or another entry) of the same round; the median
    and half the interquartile range summarise them; the best peer is the one with the smallest."""
    row = bench.Cell(4, 5, 2, {bench.BASELINE: [1.0, 2.0, 1.0, 1.0, 1.0], bench.CORE: [1.3, 2.2, 1.0, 1.4, 1.2],
                               "grouped trick": [1.5, 3.0, 1.5, 1.5, 1.5], "vmap": [2.0] * 5}, weight_bytes=0)
    assert row.ratios(bench.CORE) == pytest.approx([1.3, 1.1, 1.0, 1.4, 1.2])
    assert row.ratio(bench.CORE) == pytest.approx(1.2) and row.seconds(bench.BASELINE) == 1.0
    assert row.spread(bench.CORE) == pytest.approx((1.3 - 1.1) / 2 / 1.2)  # quartiles 1.1 and 1.3
    assert row.best_peer() == "grouped trick"
    # Against another entry of the same rounds: the core over the grouped trick, round by round.
    assert row.ratios(bench.CORE, "grouped trick") == pytest.approx([1.3 / 1.5, 2.2 / 3.0, 1.0 / 1.5, 1.4 / 1.5, 0.8])
    assert row.ratio(bench.CORE, to="grouped trick") == pytest.approx(0.8)


def test_format_report_verdicts() -> None:
    """The geometric means and the behind-the-best-peer check are computed from the times given:
    the core at 1.1x and 2.0x static conv gives a 1.48x geomean, and the second cell is behind
    the per-sample loop (2.0 / 1.5 = 1.33x, past the 10% noise); no memory table without peaks."""
    def row(B: int, core: float, loop: float) -> bench.Cell:
        times = {bench.BASELINE: [1.0] * 3, bench.CORE: [core] * 3, "batch_as_groups": [3.0] * 3,
                 "per-sample loop": [loop] * 3, "grouped trick": [2.5] * 3}
        return bench.Cell(C=4, HW=5, B=B, times=times, weight_bytes=0)

    text = bench.format_report([row(1, 1.1, 1.5), row(32, 2.0, 1.5)])
    assert "Geomean of the core 1.48x static conv; of the best peer per cell 1.50x." in text
    assert "more than 10% slower than the best peer:\n  C=4 5x5 B=32 (1.33x per-sample loop)" in text
    assert "B=1 " not in text and "Memory" not in text
    assert "slower than the best peer: none" in bench.format_report([row(1, 1.05, 1.0)])  # 5%: within the noise


def test_read_report_reads_back_the_core_table() -> None:
    """The core's table of a printed report reads back as the ratios it shows (to its two
    decimals), by short column name; an entry not run in a cell is left out; text without a
    table is an error that says so."""
    names = [bench.BASELINE, bench.CORE, "batch_as_groups", "grouped trick"]
    rows = [bench.Cell(32, 8, 1, {n: [1e-3 * (1 + i / 7)] * 3 for i, n in enumerate(names)}, 0),
            bench.Cell(64, 4, 2, {n: [2e-3 * (1 + i / 3)] * 3 for i, n in enumerate(names) if i != 2}, 0)]
    got = bench.read_report(bench.format_report(rows))
    assert got == {(32, 8, 1): {"core": 1.14, "groups": 1.29}, (64, 4, 2): {"core": 1.33}}
    with pytest.raises(ValueError, match="no time table"):
        bench.read_report("machine: somewhere\n")


def test_format_report_marks_entries_not_run() -> None:
    """An entry skipped in a cell (the per-sample loops past B = 32) shows '-' and has no geomean."""
    times = {bench.BASELINE: [1.0], bench.CORE: [1.2], "batch_as_groups": [1.2], "per-sample loop": [2.0],
             "grouped trick": [1.3]}
    big = {n: t for n, t in times.items() if n != "per-sample loop"}
    text = bench.format_report([bench.Cell(4, 5, 1, times, 0), bench.Cell(4, 5, 128, big, 0)])
    # The peers' table comes second: its row and geomean are the last of their kind.
    row = [line for line in text.splitlines() if line.split()[:3] == ["4", "5x5", "128"]][-1]
    geomean = [line for line in text.splitlines() if line.split()[:1] == ["geomean"]][-1]
    assert row.split()[-3] == "-" and geomean.split()[-2] == "-"  # the loop's column, before the grouped trick


def test_format_report_fits_a_page() -> None:
    """Two narrow tables (the core's, then the peers'), every line at most 85 columns, memory included."""
    times = {n: [1.0 + i / 10] * 3 for i, n in enumerate(bench.strategies_for("cpu"))}
    peaks = {n: 2**20 for n in times}
    text = bench.format_report([bench.Cell(256, 7, 32, times, 2**20, peaks)])
    assert max(len(line) for line in text.splitlines()) <= 85
    assert text.count("geomean") == 2 and text.count("p:vmap") == 3  # legend, time and memory tables


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
