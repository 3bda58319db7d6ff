"""What dynamic convolution costs: forward+backward time and memory against a static conv and the peers' code.

Run ``python -m dyconv_teach.bench`` (``--help`` for the options). For every cell of
the sweep (``C = O`` channels at ``H x W``, batch ``B``, ``K`` kernels of 3x3,
padding 1) it times forward+backward of every entry of :data:`STRATEGIES`: the static
``F.conv2d`` of the same shape (the baseline), the core, each of its strategies forced,
and the peers, dynamic convolution as other code writes it (:data:`PEERS`). It prints
each entry's time divided by the static convolution's, measured in the same round, as
the median over the rounds and its spread; then the memory each entry allocates.
``--device cuda`` runs the sweep on a GPU and then one training step of a ResNet-18 whose
3x3 convolutions are dynamic (:func:`resnet18`), against the static network, in float32
and under bfloat16 autocast.

Rounds: every round runs each entry once, in orders that balance which entry runs right
after which (a Williams design): on a CPU the call that follows another is slowed or sped
up by what that one left in the caches and the allocator, by up to 40% on small layers, so a
fixed order would favour some entries for good.

The pieces are reusable (the chapter on cost imports them instead of re-writing timing
code):

- :data:`STRATEGIES`: name -> callable with :func:`~dyconv_teach.functional.dynamic_conv2d`'s
  signature, the static baseline first, then the core, every strategy it can run, forced,
  and the peers;
- :func:`make_inputs`: the four tensors of one cell, all requiring grad;
- :func:`time_rounds`: the per-round times of several entries, in balanced orders;
- :func:`time_forward_backward`: the median seconds of forward+backward of one entry;
- :func:`peak_memory_forward_backward`: bytes allocated at the peak of forward+backward;
- :func:`run_sweep` and :func:`format_report`: the sweep as :class:`Cell` rows, and its tables;
- :func:`resnet18` and :func:`time_train_step`: the whole-network measurement.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import platform
import statistics
import textwrap
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile
from typing_extensions import Unpack

from ._utils import ConvOptions, DynamicConvFn, IntOrTuple, balanced_orders
from .functional import dynamic_conv2d
from .layers import DynamicConv2d
from .reference import per_sample_conv
from .strategies import STRATEGIES as CORE_STRATEGIES
from .strategies import mixed_weight_bytes

__all__ = [
    "STRATEGIES",
    "PEERS",
    "BASELINE",
    "CORE",
    "Cell",
    "static_conv2d",
    "grouped_trick_conv2d",
    "vmap_conv2d",
    "make_inputs",
    "time_rounds",
    "time_forward_backward",
    "peak_memory_forward_backward",
    "strategies_for",
    "run_sweep",
    "format_report",
    "read_report",
    "machine_description",
    "TIMING_VARIABLES",
    "resnet18",
    "time_train_step",
    "main",
]


def static_conv2d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
) -> Tensor:
    """The baseline: one ordinary ``F.conv2d`` with the first kernel of the bank as a kernel of its
    own, as a static layer has it.

    Same shapes and arguments as the dynamic versions; ``attention`` is ignored. The kernel and
    bias are detached leaves, so backward writes a gradient of one kernel, ``[O, C/g, k, k]``, and
    leaves the bank's alone: indexing the bank instead (``weight[0]``) would make backward write a
    zero-filled gradient of all K kernels, a cost no static layer has, on the baseline's side of
    every ratio.
    """
    kernel = weight[0].detach().requires_grad_()
    return F.conv2d(x, kernel, None if bias is None else bias[0].detach().requires_grad_(), **conv)  # type: ignore[arg-type]


def grouped_trick_conv2d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, stride: IntOrTuple = 1,
    padding: IntOrTuple = 0, dilation: IntOrTuple = 1, groups: int = 1,
) -> Tensor:
    """A peer: the batch-as-groups trick as timm's ``CondConv2d`` and ODConv write it (their
    forward, line for line, after the routing), which is the blog posts' with the second post's
    ``.view`` fixed: one matrix product mixes the kernels, one grouped ``F.conv2d`` runs the
    batch, autograd does the rest."""
    B, C, H, W = x.shape
    K, O = weight.shape[:2]
    aggregate_weight = torch.matmul(attention, weight.reshape(K, -1)).view(B * O, C // groups, *weight.shape[3:])
    aggregate_bias = None if bias is None else torch.matmul(attention, bias).view(B * O)
    out = F.conv2d(x.reshape(1, B * C, H, W), aggregate_weight, aggregate_bias, stride, padding, dilation,
                   groups * B)  # type: ignore[arg-type]
    return out.view(B, O, out.shape[-2], out.shape[-1])


def vmap_conv2d(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor] = None, **conv: Unpack[ConvOptions]
) -> Tensor:
    """A peer: mix the kernels with one product, then ``torch.func.vmap`` of a one-sample
    ``F.conv2d`` over the batch."""
    K = weight.shape[0]
    kernels = torch.matmul(attention, weight.reshape(K, -1)).view(attention.shape[0], *weight.shape[1:])

    def one(x_b: Tensor, w_b: Tensor, b_b: Optional[Tensor]) -> Tensor:
        return F.conv2d(x_b[None], w_b, b_b, **conv)[0]  # type: ignore[arg-type]

    if bias is None:
        return torch.func.vmap(lambda x_b, w_b: one(x_b, w_b, None))(x, kernels)
    return torch.func.vmap(one)(x, kernels, torch.matmul(attention, bias))


#: The peers, dynamic convolution as other code computes it, each with the core's signature.
PEERS: Dict[str, DynamicConvFn] = {
    "grouped trick": grouped_trick_conv2d,  # type: ignore[dict-item]
    "per-sample loop": per_sample_conv,
    "vmap": vmap_conv2d,
}
#: The name of the baseline entry of :data:`STRATEGIES`, the static convolution.
BASELINE = "static conv"
#: The name of the core's entry of :data:`STRATEGIES`, ``dynamic_conv2d`` with ``strategy='auto'``.
CORE = "dynamic_conv2d"
#: Name -> callable with the signature of :func:`~dyconv_teach.functional.dynamic_conv2d`. The first entry is
#: the static baseline every ratio is taken against; the second is the core, which picks one of
#: the strategies that follow it per shape and device; the peers come last.
STRATEGIES: Dict[str, DynamicConvFn] = {
    BASELINE: static_conv2d,
    CORE: dynamic_conv2d,
    **{name: functools.partial(dynamic_conv2d, strategy=name) for name in CORE_STRATEGIES},
    **PEERS,
}


def strategies_for(device: str) -> Dict[str, DynamicConvFn]:
    """The entries of :data:`STRATEGIES` that run on ``device`` (the fused kernels need CUDA)."""
    return {n: fn for n, fn in STRATEGIES.items() if n not in CORE_STRATEGIES or device in CORE_STRATEGIES[n].devices}


#: (C = O, H = W) of the full sweep, and its batch sizes (per device).
SWEEP_CELLS: Tuple[Tuple[int, int], ...] = ((32, 56), (64, 28), (128, 14), (256, 7))
SWEEP_BATCHES: Dict[str, Tuple[int, ...]] = {"cpu": (1, 32), "cuda": (1, 32, 128)}
#: A tiny sweep for smoke tests.
QUICK_CELLS: Tuple[Tuple[int, int], ...] = ((8, 8),)
QUICK_BATCHES: Tuple[int, ...] = (1, 4)
#: Seconds of balanced designs per cell by default on the command line (``--seconds``).
SECONDS = 3.0
#: A gap smaller than this (10%) between two entries is within what repeated runs of the same
#: code move on the machines measured; the report flags the core only past it.
NOISE = 0.10


def make_inputs(
    batch: int,
    channels: int,
    size: int,
    num_kernels: int = 4,
    kernel_size: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str = "cpu",
    channels_last: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x, weight, attention, bias)`` for one cell, ``C = O = channels``, ``H = W = size``.

    Shapes ``[B, C, H, W]``, ``[K, O, C, k, k]``, ``[B, K]`` (rows sum to 1) and
    ``[K, O]``; all are leaves that require grad, so backward computes every gradient
    a layer would need.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(num_kernels, channels, channels, kernel_size, kernel_size, generator=gen, dtype=dtype)
    weight = weight / math.sqrt(channels * kernel_size * kernel_size)
    attention = torch.softmax(torch.randn(batch, num_kernels, generator=gen, dtype=dtype), dim=1)
    bias = torch.randn(num_kernels, channels, generator=gen, dtype=dtype)
    return tuple(t.to(device).requires_grad_() for t in (x, weight, attention, bias))  # type: ignore[return-value]


def _synchronize(args: Sequence[Tensor]) -> None:
    """Wait for the GPU, so a wall-clock interval covers the work it was given."""
    if args and args[0].is_cuda:
        torch.cuda.synchronize(args[0].device)


def _forward_backward(fn: DynamicConvFn, args: Sequence[Tensor], conv: ConvOptions) -> None:
    """One forward and backward pass, starting from no stored gradients."""
    for t in args:
        t.grad = None
    out = fn(*args, **conv)
    out.backward(torch.ones_like(out))


def time_rounds(
    fns: Dict[str, DynamicConvFn],
    args: Sequence[Tensor],
    rounds: Optional[int] = None,
    timer: Callable[[], float] = time.perf_counter,
    seconds: float = 0.0,
    **conv: Unpack[ConvOptions],
) -> Dict[str, List[float]]:
    """Seconds of one forward+backward of each entry of ``fns`` in each of ``rounds`` rounds.

    One untimed pass of each first (oneDNN and cuDNN choose their kernels on the first call of
    a shape); then round ``r`` runs the entries in the ``r``-th order of a Williams design.
    ``rounds`` defaults to whole designs (as many rounds as entries, twice that for an odd
    number), one after another until ``seconds`` of wall clock have passed, and at least one:
    small layers, whose times scatter most, get the most rounds.
    Python's garbage collector is off while they run, as ``timeit`` turns it off.
    Gradients are cleared before each pass and backward starts from
    ``ones_like(out)``. ``timer`` is wall clock by default; ``time.process_time`` counts this
    process's CPU seconds instead (all threads, spinning included). On a GPU each interval is
    taken between two synchronisations.
    """
    names = list(fns)
    orders = balanced_orders(len(names))
    collect = gc.isenabled()
    if rounds is not None and rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for name in names:
        _forward_backward(fns[name], args, conv)
    times: Dict[str, List[float]] = {name: [] for name in names}
    begin = time.perf_counter()

    def more(r: int) -> bool:
        if rounds is not None:
            return r < rounds
        return r == 0 or r % len(orders) != 0 or time.perf_counter() - begin < seconds

    gc.disable()  # as timeit does: a collection in the middle of one entry's pass is not its cost
    try:
        r = 0
        while more(r):
            for name in (names[i] for i in orders[r % len(orders)]):
                _synchronize(args)
                start = timer()
                _forward_backward(fns[name], args, conv)
                _synchronize(args)
                times[name].append(timer() - start)
            r += 1
    finally:
        if collect:
            gc.enable()
    return times


def time_forward_backward(
    fn: DynamicConvFn, *args: Tensor, rounds: int = 5, timer: Callable[[], float] = time.perf_counter,
    **conv: Unpack[ConvOptions],
) -> float:
    """Median seconds of one forward+backward of ``fn(*args, **conv)`` over ``rounds`` runs
    (after one untimed run): :func:`time_rounds` for a single entry."""
    return statistics.median(time_rounds({"fn": fn}, args, rounds, timer, **conv)["fn"])


def _cpu_allocator_peak(prof: profile) -> int:
    """The peak of PyTorch's CPU allocator during a profile: the running sum of its raw
    memory records (torch.profiler has no public peak for CPU memory, so this is the one
    place that reads its private ``kineto_results``)."""
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # type: ignore[union-attr]
    current = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        current += record.nbytes()  # type: ignore[union-attr]
        peak = max(peak, current)
    return peak


def peak_memory_forward_backward(fn: DynamicConvFn, *args: Tensor, **conv: Unpack[ConvOptions]) -> int:
    """Peak bytes allocated during one forward+backward of ``fn(*args, **conv)``.

    On a GPU, from ``torch.cuda.max_memory_allocated``; on the CPU, from torch.profiler's
    memory records (``profile_memory=True``), every allocation and free of PyTorch's CPU
    allocator in time order. Either covers every tensor made during the call (the mixed
    weights, what autograd saves, the output, the gradients) and not the inputs made
    before it, nor memory that oneDNN, MKL or cuDNN take outside PyTorch's allocator
    (their scratch buffers), so it is a lower bound on the real peak.
    """
    _forward_backward(fn, args, conv)  # warm up, so one-off allocations are not counted
    for t in args:
        t.grad = None
    if args[0].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _forward_backward(fn, args, conv)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _forward_backward(fn, args, conv)  # its output is freed on return, inside the profile
    return _cpu_allocator_peak(prof)


@dataclass
class Cell:
    """One cell of the sweep: its shape and what each entry measured there, round by round."""

    C: int
    HW: int
    B: int
    times: Dict[str, List[float]]  # seconds per round, by entry
    weight_bytes: int
    peak_bytes: Dict[str, int] = field(default_factory=dict)  # empty when memory was not measured

    @property
    def label(self) -> str:
        return f"C={self.C} {self.HW}x{self.HW} B={self.B}"

    def seconds(self, name: str) -> float:
        """``name``'s median seconds."""
        return statistics.median(self.times[name])

    def ratios(self, name: str, to: str = BASELINE) -> List[float]:
        """``name``'s time divided by ``to``'s (the static conv's) of the same round, round by round."""
        return [t / s for t, s in zip(self.times[name], self.times[to])]

    def ratio(self, name: str, to: str = BASELINE) -> float:
        """The median of :meth:`ratios`: ``name``'s cost in static convolutions (or in ``to``'s)."""
        return statistics.median(self.ratios(name, to))

    def spread(self, name: str, to: str = BASELINE) -> float:
        """Half the interquartile range of :meth:`ratios`, relative to their median (0.05: +-5%)."""
        values = self.ratios(name, to)
        if len(values) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return (q3 - q1) / 2 / self.ratio(name, to)

    def shown(self, name: str, to: str = BASELINE) -> str:
        """:meth:`ratio` and :meth:`spread` as the report prints them, ``1.23+-4`` (the spread padded
        to two digits, so that right-aligned columns keep their decimal points in line)."""
        return f"{self.ratio(name, to):.2f}+-{self.spread(name, to) * 100:<2.0f}"

    def best_peer(self) -> str:
        """The peer with the smallest median ratio in this cell."""
        return min((n for n in PEERS if n in self.times), key=self.ratio)


def run_sweep(
    cells: Sequence[Tuple[int, int]] = SWEEP_CELLS,
    batches: Sequence[int] = SWEEP_BATCHES["cpu"],
    strategies: Optional[Dict[str, DynamicConvFn]] = None,
    rounds: Optional[int] = None,
    num_kernels: int = 4,
    timer: Callable[[], float] = time.perf_counter,
    seconds: float = 0.0,
    memory: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> List[Cell]:
    """Time (and optionally profile the memory of) every entry in every cell, by
    :func:`time_rounds` (``rounds``, ``timer`` and ``seconds`` per cell). The Python loops (the
    peers' per-sample loop, the ``per_sample`` strategy) are left out past 32 samples, where
    they would time Python."""
    strategies = strategies_for(device) if strategies is None else strategies
    rows: List[Cell] = []
    for channels, size in cells:
        for batch in batches:
            args = make_inputs(batch, channels, size, num_kernels, dtype=dtype, device=device,
                               channels_last=channels_last)
            fns = {n: fn for n, fn in strategies.items() if not (n in _LOOPS and batch > 32)}
            times = time_rounds(fns, args, rounds, timer, seconds, padding=1)
            peaks = {n: peak_memory_forward_backward(fns[n], *args, padding=1) for n in fns} if memory else {}
            rows.append(Cell(channels, size, batch, times, mixed_weight_bytes(batch, args[1]), peaks))
    return rows


_LOOPS = ("per_sample", "per-sample loop")

#: Short column names for the report's tables.
_SHORT = {BASELINE: "static", CORE: "core", "batch_as_groups": "groups", "kernel_branches": "K-branch",
          "per_sample": "per-sample", "fused": "fused", "grouped trick": "p:grouped", "per-sample loop": "p:loop",
          "vmap": "p:vmap"}


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _legend(title: str, names: Sequence[str]) -> str:
    """``title`` and what each short column name in ``names`` stands for, wrapped at 80 columns."""
    keys = [f"{_SHORT.get(n, n)} = {n}" for n in names if _SHORT.get(n, n) != n]
    return textwrap.fill(title + (" (" + "; ".join(keys) + ")" if keys else "") + ":", 80)


def _cell_key(row: Cell) -> str:
    """A row's first columns, under the heading ``C=O HxW B``."""
    return f"{row.C:>5} {f'{row.HW}x{row.HW}':>7} {row.B:>4}"


def format_report(rows: Sequence[Cell], noise: float = NOISE) -> str:
    """The time tables (median ratio to the static conv, +- half the interquartile range in
    percent; first the core and its strategies, then the peers and the core over the best peer
    per cell, each narrow enough for a page), the geometric means, and, when measured, the memory
    table (MiB). A cell where the core is slower than the best peer by more than ``noise`` is
    listed. An entry not run in a cell shows ``-``."""
    names = list(dict.fromkeys(n for row in rows for n in row.times))[1:]
    w = 11
    key = f"{'C=O':>5} {'HxW':>7} {'B':>4}"
    lines = [textwrap.fill("Forward+backward time / static conv (F.conv2d with a kernel of its own): median over "
                           "rounds +- half the interquartile range in %.", 80)]
    behind = []
    titles = {False: "The core and its strategies",
              True: "The peers, and core/peer = the core's median over the best peer's"}
    for peers, title in titles.items():
        part = [n for n in names if (n in PEERS) == peers]
        lines += ["", _legend(title, part),
                  key + ("" if peers else f"{'static ms':>10}") + "".join(f"{_SHORT.get(n, n):>{w}}" for n in part)
                  + (f"{'core/peer':>{w}}" if peers else "")]
        for row in rows:
            line = _cell_key(row) + ("" if peers else f"{row.seconds(BASELINE) * 1e3:>10.3f}")
            line += "".join(f"{row.shown(n):>{w}}" if n in row.times
                            else f"{'-':>{w}}" for n in part)
            if peers:
                core_vs_peer = row.ratio(CORE) / row.ratio(row.best_peer())
                if core_vs_peer > 1 + noise:
                    behind.append(f"{row.label} ({core_vs_peer:.2f}x {row.best_peer()})")
                line += f"{core_vs_peer:>{w}.2f}"
            lines.append(line.rstrip())
        geo = [f"{_geomean([r.ratio(n) for r in rows]):>{w}.2f}" if all(n in r.times for r in rows)
               else f"{'-':>{w}}" for n in part]
        lines.append(f"{'geomean':>{len(key) + (0 if peers else 10)}}" + "".join(geo))
    best_peer_geo = _geomean([r.ratio(r.best_peer()) for r in rows])
    lines += ["", f"Geomean of the core {_geomean([r.ratio(CORE) for r in rows]):.2f}x static conv; of the best "
              f"peer per cell {best_peer_geo:.2f}x.",
              f"Cells where the core is more than {noise:.0%} slower than the best peer:"
              + ("".join(f"\n  {cell}" for cell in behind) if behind else " none")]
    if rows[0].peak_bytes:
        mib = 2.0**20
        lines += ["", textwrap.fill(
            "Memory, MiB: the per-sample weight [B*O, C/g, k, k] that batch-as-groups builds, and the peak "
            "allocated during forward+backward (tensors made during the call only, inputs excluded; scratch "
            "memory of oneDNN/MKL/cuDNN outside PyTorch's allocator is not seen), in two tables:", 80)]
        entries = [BASELINE, *names]
        half = (len(entries) + 1) // 2
        for first, part in ((True, entries[:half]), (False, entries[half:])):
            head = key + (f"{'weight':>10}" if first else "")
            lines += ["", head + "".join(f"{_SHORT.get(n, n):>{w}}" for n in part)]
            for row in rows:
                line = _cell_key(row) + (f"{row.weight_bytes / mib:>10.2f}" if first else "")
                lines.append(line + "".join(
                    f"{row.peak_bytes[n] / mib:>{w}.2f}" if n in row.peak_bytes else f"{'-':>{w}}" for n in part))
    return "\n".join(lines)


def read_report(text: str) -> Dict[Tuple[int, int, int], Dict[str, float]]:
    """The first time table of a report by :func:`format_report` (what ``python -m
    dyconv_teach.bench`` prints, as the runs stored in the book's ``book/data``), read back:
    ``{(C, H, B): {column: median time / static conv}}`` by the table's short column names
    (``core``, ``groups``, ``K-branch``, ``per-sample``, ...); an entry the cell did not run is left out."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["C=O"])
    except StopIteration:
        raise ValueError("no time table (a line starting with 'C=O') in the text") from None
    columns = lines[start].split()[5:]  # after C=O, HxW, B and "static ms"
    cells: Dict[Tuple[int, int, int], Dict[str, float]] = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if not parts or not parts[0].isdigit():
            break
        C, H, B = int(parts[0]), int(parts[1].split("x")[0]), int(parts[2])
        cells[C, H, B] = {c: float(p.split("+-")[0]) for c, p in zip(columns, parts[4:]) if p != "-"}
    return cells


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


#: Environment variables that change what a timing measures (kernels, threads, the memory
#: allocator); :func:`machine_description` names those that are set.
TIMING_VARIABLES: Tuple[str, ...] = (
    "OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "GLIBC_TUNABLES",
    "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE",
)


def machine_description(device: str = "cpu") -> str:
    """Where timings are taken: processor, cores, OS, torch version, threads, oneDNN and the
    vector instructions ATen's kernels use (``DEFAULT`` under ``ATEN_CPU_CAPABILITY=default``),
    the :data:`TIMING_VARIABLES` that are set (and the GPU, for ``device='cuda'``)."""
    text = (
        f"machine: {_cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"oneDNN available: {torch.backends.mkldnn.is_available()}, "
        f"ATen CPU capability: {torch.backends.cpu.get_cpu_capability()}"
    )
    settings = [f"{name}={os.environ[name]}" for name in TIMING_VARIABLES if name in os.environ]
    if settings:
        text += "\nset: " + " ".join(settings)
    if device == "cuda":
        cudnn = torch.backends.cudnn.version()
        text += f"\nGPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN {cudnn}"
    return text


# -- a whole network: ResNet-18 ---------------------------------------------------------------


class _BasicBlock(nn.Module):
    """ResNet's two-conv block; ``conv`` builds its 3x3 convolutions."""

    def __init__(self, conv: Callable[..., nn.Module], c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


def resnet18(dynamic: bool = False, num_kernels: int = 4, num_classes: int = 1000, strategy: str = "auto") -> nn.Module:
    """ResNet-18 (He et al., 2016) as torchvision builds it; with ``dynamic=True`` every 3x3
    convolution of the residual blocks is a :class:`~dyconv_teach.layers.DynamicConv2d` (the stem stays static,
    as in the paper's DY-ResNet). ``strategy`` is passed to those layers."""

    def conv(c_in: int, c_out: int, k: int, **kwargs: object) -> nn.Module:
        if dynamic:
            return DynamicConv2d(c_in, c_out, k, num_kernels=num_kernels, strategy=strategy, **kwargs)  # type: ignore[arg-type]
        return nn.Conv2d(c_in, c_out, k, **kwargs)  # type: ignore[arg-type]

    layers: List[nn.Module] = [
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
    ]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(conv, c_in, c_out, stride), _BasicBlock(conv, c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def time_train_step(
    model: nn.Module,
    batch: int,
    image_size: int = 224,
    amp_dtype: Optional[torch.dtype] = None,
    repeats: int = 10,
    device: str = "cuda",
) -> float:
    """Median seconds of one SGD step (forward, cross-entropy, backward, update) of
    ``model`` on random channels_last images, optionally under ``torch.autocast``."""
    model = model.to(device).to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    times = []
    for i in range(repeats + 3):  # three warm-up steps
        _synchronize([x])
        start = time.perf_counter()
        step()
        _synchronize([x])
        if i >= 3:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _resnet_report(batch: int, image_size: int, device: str, repeats: int) -> str:
    """Static vs dynamic ResNet-18 train steps, each strategy forced and 'auto', fp32 and bf16 autocast."""
    lines = [f"ResNet-18 training step, batch {batch}, {image_size}x{image_size}, K=4 (median of {repeats}):",
             f"{'model':<28} {'float32 ms':>11} {'ratio':>7} {'bf16 autocast ms':>17} {'ratio':>7}"]
    static: Dict[Optional[torch.dtype], float] = {}
    variants = [("static", False, "auto"), ("dynamic, auto", True, "auto")]
    variants += [(f"dynamic, {name}", True, name) for name in strategies_for(device) if name in CORE_STRATEGIES]
    for label, dynamic, strategy in variants:
        cells = []
        for amp in (None, torch.bfloat16):
            torch.manual_seed(0)
            try:
                seconds = time_train_step(resnet18(dynamic, strategy=strategy), batch, image_size, amp, repeats, device)
            except torch.OutOfMemoryError:
                cells.append(f"{'out of memory':>11} {'':>7}")
                continue
            if not dynamic:
                static[amp] = seconds
            cells.append(f"{seconds * 1e3:>{11 if amp is None else 17}.1f} {seconds / static[amp]:>6.2f}x")
        lines.append(f"{label:<28} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: parse the options, run the sweep, print the machine and the tables."""
    parser = argparse.ArgumentParser(prog="python -m dyconv_teach.bench", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default cpu)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the sweep's tensors")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs in the sweep")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per cell, each running every entry once; the median is kept (default: "
                             "balanced designs of as many rounds as entries, for --seconds)")
    parser.add_argument("--seconds", type=float, default=SECONDS,
                        help=f"without --rounds, time each cell in whole designs for about this long, at least one "
                             f"(default {SECONDS:g})")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny sweep (C=8, 8x8, B in {1, 4}) that runs in seconds")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with this process's CPU seconds instead of wall clock (steadier on a busy machine; CPU only)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory table (its profiling pass)")
    parser.add_argument("--resnet", type=int, default=None, metavar="BATCH",
                        help="also time ResNet-18 train steps at this batch (default on cuda: 256; on cpu: none)")
    parser.add_argument("--resnet-size", type=int, default=224, help="image size of the ResNet-18 step (default 224)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.seconds < 0:
        parser.error(f"--seconds must be >= 0, got {args.seconds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.cpu_time:
        parser.error("--cpu-time measures CPU seconds: it cannot time GPU work")
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    print(machine_description(args.device))
    rounds = f"{args.rounds} balanced rounds" if args.rounds else f"balanced rounds for {args.seconds:g} s per cell"
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}; {rounds}, K=4, 3x3 kernel, "
          f"padding 1, {args.dtype}{', channels_last' if args.channels_last else ''}, on {args.device}")
    rows = run_sweep(
        QUICK_CELLS if args.quick else SWEEP_CELLS,
        QUICK_BATCHES if args.quick else SWEEP_BATCHES[args.device],
        rounds=args.rounds,
        timer=time.process_time if args.cpu_time else time.perf_counter,
        seconds=args.seconds,
        memory=not args.no_memory,
        device=args.device,
        dtype=dtype,
        channels_last=args.channels_last,
    )
    print(format_report(rows))
    resnet_batch = args.resnet if args.resnet is not None else (256 if args.device == "cuda" else None)
    if resnet_batch:
        print()
        print(_resnet_report(resnet_batch, args.resnet_size, args.device, 10 if args.device == "cuda" else 2))


if __name__ == "__main__":
    main()
