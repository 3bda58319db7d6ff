"""What dynamic convolution costs: forward+backward time and memory against a static conv.

Run ``python -m dyconv_teach.bench`` (``--help`` for the options). For every cell of
the sweep (``C = O`` channels at ``H x W``, batch ``B``, ``K`` kernels of 3x3,
padding 1) it times forward+backward of every entry of :data:`STRATEGIES` and prints
each one's time divided by the static ``F.conv2d`` of the same shape, measured in the
same run; then the memory each strategy allocates.

The pieces are reusable (a chapter on cost imports them instead of re-writing timing
code):

- :data:`STRATEGIES`: name -> callable with :func:`~dyconv_teach.functional.dynamic_conv2d`'s
  signature, the static baseline first;
- :func:`make_inputs`: the four tensors of one cell, all requiring grad;
- :func:`time_forward_backward`: the minimum seconds of forward+backward over repeats;
- :func:`peak_memory_forward_backward`: bytes allocated at the peak of forward+backward;
- :func:`per_sample_weight_bytes`: the size of the ``[B*O, C/g, kH, kW]`` mixed weight;
- :func:`run_sweep` and :func:`format_report`: the sweep as data, and its printed tables.

On a machine shared with other work, wall-clock ratios move from run to run; run
twice, or pass ``--cpu-time``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from .functional import IntPair, Padding, _batch_as_groups, _kernel_branches, check_conv_args, dynamic_conv2d
from .reference import per_sample_conv2d

__all__ = [
    "STRATEGIES",
    "static_conv2d",
    "make_inputs",
    "time_forward_backward",
    "peak_memory_forward_backward",
    "per_sample_weight_bytes",
    "run_sweep",
    "format_report",
    "machine_description",
    "main",
]

Conv = Callable[..., Tensor]


def static_conv2d(
    x: Tensor,
    weight: Tensor,
    attention: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> Tensor:
    """The baseline: one ordinary ``F.conv2d`` with the first kernel of the bank.

    Same shapes and arguments as the dynamic versions; ``attention`` is ignored.
    """
    return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation, groups)


def _forced(strategy: Callable[..., Tensor], doc: str) -> Conv:
    """``strategy`` (a private strategy of :mod:`~dyconv_teach.functional`) behind
    :func:`dynamic_conv2d`'s signature, whatever its dispatch rule would pick."""

    def conv(
        x: Tensor,
        weight: Tensor,
        attention: Tensor,
        bias: Optional[Tensor] = None,
        stride: IntPair = 1,
        padding: Padding = 0,
        dilation: IntPair = 1,
        groups: int = 1,
    ) -> Tensor:
        stride_, padding_, dilation_ = check_conv_args(x.shape[1], weight.shape[1], groups, stride, padding, dilation)
        return strategy(x, weight, attention, bias, stride_, padding_, dilation_, groups)

    conv.__doc__ = doc
    return conv


#: Name -> callable with the signature of :func:`dynamic_conv2d`. The first entry is
#: the static baseline every ratio is taken against; the second is the core, which
#: picks one of the next two per shape.
STRATEGIES: Dict[str, Conv] = {
    "static conv": static_conv2d,
    "dynamic_conv2d": dynamic_conv2d,
    "batch-as-groups": _forced(_batch_as_groups, "The whole batch as one grouped F.conv2d, always."),
    "K-branch sum": _forced(_kernel_branches, "One static F.conv2d with all K*O kernels, outputs mixed, always."),
    "per-sample loop": per_sample_conv2d,
}
BASELINE = "static conv"
CORE = "dynamic_conv2d"

#: (C = O, H = W) of the full sweep, and its batch sizes.
SWEEP_CELLS: Tuple[Tuple[int, int], ...] = ((32, 56), (64, 28), (128, 14), (256, 7))
SWEEP_BATCHES: Tuple[int, ...] = (1, 32)
#: A tiny sweep for smoke tests.
QUICK_CELLS: Tuple[Tuple[int, int], ...] = ((8, 8),)
QUICK_BATCHES: Tuple[int, ...] = (1, 4)


def make_inputs(
    batch: int,
    channels: int,
    size: int,
    num_kernels: int = 4,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, weight, attention, bias)`` for one cell, ``C = O = channels``, ``H = W = size``.

    Shapes ``[B, C, H, W]``, ``[K, O, C, k, k]``, ``[B, K]`` (rows sum to 1) and
    ``[K, O]``; all are leaves that require grad, so backward computes every gradient
    a layer would need.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    weight = torch.randn(num_kernels, channels, channels, kernel_size, kernel_size, generator=gen, dtype=dtype)
    weight = weight / math.sqrt(channels * kernel_size * kernel_size)
    attention = torch.softmax(torch.randn(batch, num_kernels, generator=gen, dtype=dtype), dim=1)
    bias = torch.randn(num_kernels, channels, generator=gen, dtype=dtype)
    return tuple(t.requires_grad_() for t in (x, weight, attention, bias))  # type: ignore[return-value]


def _forward_backward(fn: Conv, args: Sequence[Tensor], kwargs: Dict[str, object]) -> None:
    """One forward and backward pass, starting from no stored gradients."""
    for t in args:
        t.grad = None
    out = fn(*args, **kwargs)
    out.backward(torch.ones_like(out))


def time_forward_backward(
    fn: Conv,
    *args: Tensor,
    repeats: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    **kwargs: object,
) -> float:
    """Seconds one forward+backward of ``fn(*args, **kwargs)`` takes: the MINIMUM over ``repeats``.

    The minimum is the run least disturbed by other work on the machine. ``warmup``
    untimed runs come first (oneDNN builds its kernels on the first call of a shape).
    Gradients are cleared before each run, and backward starts from ``ones_like(out)``.
    ``timer`` is wall clock by default; ``time.process_time`` counts this process's
    CPU seconds instead (all threads, spinning included).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        _forward_backward(fn, args, kwargs)
    times = []
    for _ in range(repeats):
        start = timer()
        _forward_backward(fn, args, kwargs)
        times.append(timer() - start)
    return min(times)


def peak_memory_forward_backward(fn: Conv, *args: Tensor, **kwargs: object) -> int:
    """Peak bytes allocated during one forward+backward of ``fn(*args, **kwargs)``.

    Measured with ``torch.profiler`` (``profile_memory=True``): its memory records
    give every allocation and free of PyTorch's CPU allocator in time order, and the
    peak of their running sum is returned. It covers every tensor made during the
    call (the mixed weights, what autograd saves, the output, the gradients) and not
    the inputs made before it, nor memory that oneDNN or MKL take outside PyTorch's
    allocator (their scratch buffers), so it is a lower bound on the real peak.
    """
    _forward_backward(fn, args, kwargs)  # warm up, so one-off allocations are not counted
    for t in args:
        t.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **kwargs)
        out.backward(torch.ones_like(out))
        del out
    # torch.profiler has no public peak for CPU memory; its raw records do give it.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()
        peak = max(peak, current)
    return peak


def per_sample_weight_bytes(
    batch: int,
    out_channels: int,
    in_channels: int,
    kernel_size: IntPair = 3,
    groups: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes of the mixed per-sample weight ``[B*O, C/g, kH, kW]`` that batch-as-groups builds."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * out_channels * (in_channels // groups) * kh * kw * itemsize


Row = Dict[str, object]


def run_sweep(
    cells: Sequence[Tuple[int, int]] = SWEEP_CELLS,
    batches: Sequence[int] = SWEEP_BATCHES,
    strategies: Optional[Dict[str, Conv]] = None,
    repeats: int = 5,
    num_kernels: int = 4,
    timer: Callable[[], float] = time.perf_counter,
    memory: bool = True,
) -> List[Row]:
    """Time (and optionally profile the memory of) every strategy in every cell.

    Returns one dict per cell: ``C``, ``HW``, ``B``, ``seconds`` and ``peak_bytes``
    (name -> value; ``peak_bytes`` empty when ``memory`` is False) and ``weight_bytes``
    (:func:`per_sample_weight_bytes`). The strategies of one cell are timed
    round-robin, one repeat each in turn, so a burst of load on the machine hits all
    of them alike.
    """
    strategies = STRATEGIES if strategies is None else strategies
    rows: List[Row] = []
    for channels, size in cells:
        for batch in batches:
            args = make_inputs(batch, channels, size, num_kernels)
            seconds = {name: math.inf for name in strategies}
            for fn in strategies.values():
                time_forward_backward(fn, *args, repeats=1, warmup=0, timer=timer, padding=1)  # warm-up
            for _ in range(repeats):
                for name, fn in strategies.items():
                    elapsed = time_forward_backward(fn, *args, repeats=1, warmup=0, timer=timer, padding=1)
                    seconds[name] = min(seconds[name], elapsed)
            peaks = {name: peak_memory_forward_backward(fn, *args, padding=1) for name, fn in strategies.items()} if memory else {}
            rows.append(
                {
                    "C": channels,
                    "HW": size,
                    "B": batch,
                    "seconds": seconds,
                    "peak_bytes": peaks,
                    "weight_bytes": per_sample_weight_bytes(batch, channels, channels),
                }
            )
    return rows


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def format_report(rows: Sequence[Row], target: float = 1.25, noise: float = 0.05) -> str:
    """The time table (ratios to the static conv), geometric means, the two targets
    and, when measured, the memory table (MiB).

    The targets: the geometric mean of the core's ratio at most ``target``, and no
    cell where the core is slower than the best other strategy by more than
    ``noise`` (where the core picks batch-as-groups it runs the same code, so gaps
    of a few percent are timing noise).
    """
    names = list(rows[0]["seconds"])  # type: ignore[call-overload]
    others = [n for n in names if n not in (BASELINE, CORE)]
    cell_w = 16
    head = f"{'C=O':>5} {'HxW':>7} {'B':>3} {'static ms':>10}" + "".join(f"{n:>{cell_w}}" for n in names[1:])
    head += f"{'core/best other':>{cell_w}}"
    lines = ["Forward+backward time / static conv (min over repeats)", head]
    ratios: Dict[str, List[float]] = {n: [] for n in names[1:]}
    best_other: List[float] = []
    slower = []
    for row in rows:
        sec: Dict[str, float] = row["seconds"]  # type: ignore[assignment]
        base = sec[BASELINE]
        line = f"{row['C']:>5} {str(row['HW']) + 'x' + str(row['HW']):>7} {row['B']:>3} {base * 1e3:>10.2f}"
        for n in names[1:]:
            ratios[n].append(sec[n] / base)
            line += f"{sec[n] / base:>{cell_w - 1}.2f}x"
        best = min(sec[n] for n in others) / base
        best_other.append(best)
        line += f"{ratios[CORE][-1] / best:>{cell_w - 1}.2f}x"
        if ratios[CORE][-1] > best * (1 + noise):
            slower.append(f"C={row['C']} {row['HW']}x{row['HW']} B={row['B']} ({ratios[CORE][-1] / best:.2f}x)")
        lines.append(line)
    lines.append(f"{'geomean':>28}" + "".join(f"{_geomean(ratios[n]):>{cell_w - 1}.2f}x" for n in names[1:]))
    core_geo = _geomean(ratios[CORE])
    lines.append(
        f"Target: geomean of {CORE} <= {target:.2f}x static conv: {core_geo:.2f}x, "
        f"{'met' if core_geo <= target else 'NOT met'} (best other strategy per cell: {_geomean(best_other):.2f}x)"
    )
    lines.append(
        f"Target: no cell slower than the best other strategy (by more than {noise:.0%}, timing noise): "
        + ("met" if not slower else "NOT met in " + "; ".join(slower))
    )
    if rows[0]["peak_bytes"]:
        mib = 2.0**20
        lines += [
            "",
            "Memory, MiB: the per-sample weight [B*O, C/g, k, k] that batch-as-groups builds, and the peak",
            "of PyTorch's CPU allocator during forward+backward (torch.profiler memory records; tensors made",
            "during the call only, inputs excluded; oneDNN/MKL scratch outside PyTorch's allocator is not seen)",
            f"{'C=O':>5} {'HxW':>7} {'B':>3} {'weight':>10}" + "".join(f"{n:>{cell_w}}" for n in names),
        ]
        for row in rows:
            peaks: Dict[str, int] = row["peak_bytes"]  # type: ignore[assignment]
            line = f"{row['C']:>5} {str(row['HW']) + 'x' + str(row['HW']):>7} {row['B']:>3}"
            line += f"{row['weight_bytes'] / mib:>10.2f}"  # type: ignore[operator]
            lines.append(line + "".join(f"{peaks[n] / mib:>{cell_w}.2f}" for n in names))
    return "\n".join(lines)


def _cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """Where timings are taken: processor, cores, OS, torch version, threads and oneDNN."""
    return (
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"oneDNN available: {torch.backends.mkldnn.is_available()}"
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: parse the options, run the sweep, print the machine and the tables."""
    parser = argparse.ArgumentParser(prog="python -m dyconv_teach.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per strategy and cell; the minimum is kept (default 5)")
    parser.add_argument("--quick", action="store_true", help="a tiny sweep (C=8, 8x8, B in {1, 4}) that runs in seconds")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU seconds instead of wall clock (steadier on a busy machine)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    print(machine_description())
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}; {args.repeats} repeats, K=4, 3x3 kernel, padding 1, float32")
    rows = run_sweep(
        QUICK_CELLS if args.quick else SWEEP_CELLS,
        QUICK_BATCHES if args.quick else SWEEP_BATCHES,
        repeats=args.repeats,
        timer=time.process_time if args.cpu_time else time.perf_counter,
    )
    print(format_report(rows))


if __name__ == "__main__":
    main()
