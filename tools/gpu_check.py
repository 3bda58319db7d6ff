"""Every check and measurement of dyconv_teach that needs a GPU, in one run.

    python tools/gpu_check.py OUTDIR [--budget SECONDS]

GPU time is short and rare here, so one script does it all and writes what it found
to ``OUTDIR/gpu-<device>-<date>.csv`` (one row per check or timing, with the device,
torch version and date on every row) and a log of what it printed:

1. correctness on CUDA of every strategy of the core (float64 against the per-sample
   loop, values and all four gradients) and a gradcheck;
2. ``DynamicConv2d`` under ``torch.autocast`` (bfloat16, float16) with a low-precision
   input: output dtype, error against float32, finite float32 gradients;
3. ``torch.compile(fullgraph=True, dynamic=True)`` over several batch sizes: results
   against eager and the number of compilations;
4. the benchmark sweep (``dyconv_teach.bench.run_sweep``) in float32 and in bfloat16
   channels_last, B in {1, 32, 128};
5. the fused kernels alone: error against batch-as-groups in float32, and the time of the
   forward, input-gradient and bank-gradient kernels per sweep cell with the tiles chosen;
6. one training step of ResNet-18 (``bench.resnet18``), static and with dynamic 3x3
   convolutions for every strategy, float32 and bfloat16 autocast, eager (and compiled
   while the time budget lasts).

Every row is also appended to ``OUTDIR/gpu-log.jsonl`` as it is measured, so a run cut
short still leaves what it found.

Parts past ``--budget`` seconds are skipped and say so, so the run ends in its time.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyconv_teach import DynamicConv2d, bench, dynamic_conv2d  # noqa: E402
from dyconv_teach.functional import STRATEGY_NAMES  # noqa: E402
from dyconv_teach.reference import per_sample_conv  # noqa: E402
from dyconv_teach.strategies import STRATEGIES  # noqa: E402

ROWS: List[Dict[str, Any]] = []
START = time.time()
LOG: List[Any] = []  # the open JSONL file: every row is written as soon as it is measured
# --cpu-smoke replaces these to try the whole script on a CPU at toy sizes before a GPU run.
DEVICE = "cuda"
SWEEP: Dict[str, Any] = {"cells": bench.SWEEP_CELLS, "batches": bench.SWEEP_BATCHES["cuda"], "rounds": 20}
RESNET: Dict[str, int] = {"batch": 256, "size": 224, "repeats": 10}


def runs_here(strategy: str) -> bool:
    """Whether ``strategy`` runs on DEVICE (the fused kernels: CUDA, or the CPU under Triton's interpreter)."""
    if strategy not in STRATEGIES or os.environ.get("TRITON_INTERPRET") == "1":  # auto, benchmark
        return True
    return DEVICE in STRATEGIES[strategy].devices


def record(part: str, **fields: Any) -> None:
    row = {"part": part, "t": round(time.time() - START, 1), **fields}
    ROWS.append(row)
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if LOG:
        LOG[0].write(line + "\n")
        LOG[0].flush()


def guarded(part: str, fn: Callable[[], None]) -> None:
    """Run one part; an exception is recorded as that part's failure and the run goes on."""
    t0 = time.time()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - a failed part must not cost the other parts
        record(part, ok=False, error=f"{type(exc).__name__}: {exc}"[:500], trace=traceback.format_exc()[-1500:])
    record(part + "_seconds", value=round(time.time() - t0, 1))


def correctness() -> None:
    dev = DEVICE
    gen = torch.Generator().manual_seed(0)
    cases = [  # B, C, O, K, groups, kernel, H, W, conv
        (3, 4, 6, 3, 2, (3, 3), 9, 8, {"stride": 2, "padding": 1}),
        (5, 6, 6, 4, 1, (3, 2), 7, 7, {"padding": "same", "dilation": (2, 1)}),
        (33, 8, 8, 4, 4, (3, 3), 6, 6, {"padding": 1}),
        (1, 5, 3, 2, 1, (1, 1), 4, 5, {}),
    ]
    for strategy in filter(runs_here, STRATEGY_NAMES):
        worst = 0.0
        for B, C, O, K, g, kernel, H, W, conv in cases:
            kw: Dict[str, Any] = {"generator": gen, "dtype": torch.float64}
            tensors = [torch.randn(B, C, H, W, **kw), torch.randn(K, O, C // g, *kernel, **kw),
                       torch.randn(B, K, **kw), torch.randn(K, O, **kw)]
            for channels_last in (False, True):
                args = [t.to(dev).requires_grad_() for t in tensors]
                if channels_last:
                    args[0] = args[0].detach().to(memory_format=torch.channels_last).requires_grad_()
                out = dynamic_conv2d(*args, groups=g, **conv, strategy=strategy)
                ref = per_sample_conv(*args, groups=g, **conv)
                grad = torch.randn_like(ref)
                got = torch.autograd.grad(out, args, grad)
                want = torch.autograd.grad(ref, args, grad)
                errors = [(out - ref).abs().max().item(), *((a - b).abs().max().item() for a, b in zip(got, want))]
                worst = max(worst, *errors)
        record("correctness_f64", strategy=strategy, worst_abs_err=worst, ok=worst < 1e-9)
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=dev, requires_grad=True)
        w = torch.randn(3, 4, 2, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
        a = torch.randn(2, 3, dtype=torch.float64, device=dev, requires_grad=True)
        b = torch.randn(3, 4, dtype=torch.float64, device=dev, requires_grad=True)
        conv = functools.partial(dynamic_conv2d, padding=1, groups=2, strategy=strategy)
        ok = torch.autograd.gradcheck(conv, (x, w, a, b))
        record("gradcheck", strategy=strategy, ok=bool(ok))


def amp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          DynamicConv2d(32, 64, 3, padding=1), nn.ReLU(), DynamicConv2d(64, 64, 3, stride=2, groups=2))
    model = model.to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 32, 32, device=DEVICE).to(memory_format=torch.channels_last)
    reference = model(x)
    for dtype in (torch.bfloat16, torch.float16):
        model.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype):
            out = model(x)
        rel = ((out.float() - reference).norm() / reference.norm()).item()
        out.float().square().mean().backward()
        grads_ok = all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
                       for p in model.parameters())
        record("amp", dtype=str(dtype), out_dtype=str(out.dtype), rel_err_vs_fp32=rel,
               channels_last_out=out.is_contiguous(memory_format=torch.channels_last),
               ok=out.dtype == dtype and rel < 0.05 and grads_ok)


def compile_dynamic() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), DynamicConv2d(16, 32, 3, padding=1), nn.ReLU(),
                          DynamicConv2d(32, 32, 3, stride=2)).to(DEVICE)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    worst, counts = 0.0, []
    for B in (2, 3, 5, 8, 13):  # nn.Conv2d's own fake convolution guards at B = 16 on the CPU
        x = torch.randn(B, 3, 24, 24, device=DEVICE, requires_grad=True)
        out = compiled(x)
        worst = max(worst, (out - model(x)).abs().max().item())
        out.sum().backward()
        counts.append(counter.frame_count)
    record("compile_dynamic", compilations_after_each_batch=counts, max_abs_err=worst,
           ok=worst < 1e-3 and counts[-1] == counts[0])


def sweep() -> None:
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
        rows = bench.run_sweep(SWEEP["cells"], SWEEP["batches"], rounds=SWEEP["rounds"], device=DEVICE, dtype=dtype,
                               channels_last=channels_last)
        print(bench.format_report(rows), flush=True)
        for row in rows:
            for name in row.times:
                record("sweep", dtype=str(dtype), channels_last=channels_last, C=row.C, HW=row.HW, B=row.B,
                       strategy=name, ms=round(row.seconds(name) * 1e3, 4), ratio=round(row.ratio(name), 3),
                       peak_MiB=round(row.peak_bytes.get(name, 0) / 2**20, 2))


def fused_detail() -> None:
    """Where the fused kernels spend their time, per sweep cell in bfloat16 channels_last: the
    forward, the input gradient and the bank+attention gradients alone, and the tile the
    autotuner chose for each; and their error against batch-as-groups in float32 without TF32."""
    if "fused" not in STRATEGY_NAMES or not runs_here("fused"):
        record("fused_detail", skipped="no triton, or no CUDA and no interpreter")
        return
    from dyconv_teach.kernels import triton_conv as tc

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for C, HW in SWEEP["cells"]:
            x, w, a, b = bench.make_inputs(32, C, HW, device=DEVICE)
            ref = dynamic_conv2d(x, w, a, b, padding=1, strategy="batch_as_groups")
            out = dynamic_conv2d(x, w, a, b, padding=1, strategy="fused")
            grad = torch.randn_like(ref)
            g_ref = torch.autograd.grad(ref, (x, w, a, b), grad)
            g_out = torch.autograd.grad(out, (x, w, a, b), grad)
            errs = [((o - r).abs().max() / r.abs().max()).item() for o, r in zip((out, *g_out), (ref, *g_ref))]
            record("fused_fp32_vs_grouped", C=C, HW=HW, B=32, rel_err_out_x_w_a_b=[f"{e:.1e}" for e in errs],
                   ok=max(errs) < 1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    def ms(fn: Callable[[], Any], repeats: int = 20 if DEVICE == "cuda" else 1) -> float:
        """Median milliseconds of ``fn`` after one warm-up call, between GPU synchronisations."""
        fn()
        times = []
        for _ in range(repeats):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    for C, HW in SWEEP["cells"]:
        for B in SWEEP["batches"]:
            x, w, a, b = (t.detach() for t in bench.make_inputs(B, C, HW, dtype=torch.bfloat16, device=DEVICE,
                                                                 channels_last=True))
            conv = ((1, 1), (1, 1), (1, 1), 1)
            out = tc.fused_forward(x, w, a, b, *conv)
            grad = torch.randn_like(out)
            call = functools.partial
            times = {
                "forward": ms(call(tc.fused_forward, x, w, a, b, *conv)),
                "input_grad": ms(call(tc.fused_backward, grad, x, w, a, b, *conv, (True, False, False, False))),
                "bank_and_attention_grads": ms(
                    call(tc.fused_backward, grad, x, w, a, b, *conv, (False, True, True, True))),
                "static_forward": ms(call(torch.nn.functional.conv2d, x, w[0], b[0], padding=1)),
                "static_backward": ms(call(torch.ops.aten.convolution_backward, grad, x, w[0], [C], [1, 1], [1, 1],
                                           [1, 1], False, [0, 0], 1, [True, True, True])),
            }
            tiles = tc.chosen_tiles()
            record("fused_kernels_bf16", C=C, HW=HW, B=B, ms={k: round(v, 4) for k, v in times.items()}, tiles=tiles)


RESNET_LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))  # (C = O, H = W) of ResNet-18's 3x3 convolutions
BEST: Dict[str, Dict[int, str]] = {}  # dtype -> out channels -> the fastest strategy at B = 256


def resnet_layers() -> None:
    """Forward+backward of each ResNet-18 3x3 layer shape at B = 64 and 256, every strategy,
    float32 and bfloat16 channels_last; remembers the fastest strategy per layer at B = 256."""
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
        batches = (64, 256) if DEVICE == "cuda" else (2,)
        rows = bench.run_sweep(RESNET_LAYERS, batches, rounds=max(1, SWEEP["rounds"] // 2), memory=False,
                               device=DEVICE, dtype=dtype, channels_last=channels_last)
        print(bench.format_report(rows), flush=True)
        for row in rows:
            for name in row.times:
                record("resnet_layer", dtype=str(dtype), C=row.C, HW=row.HW, B=row.B, strategy=name,
                       ms=round(row.seconds(name) * 1e3, 4), ratio=round(row.ratio(name), 3))
            if row.B == max(r.B for r in rows):
                dynamic = {n: row.seconds(n) for n in row.times if n in STRATEGIES}
                BEST.setdefault(str(dtype), {})[row.C] = min(dynamic, key=dynamic.__getitem__)
    record("resnet_layer_best", best=BEST)


def resnet_best() -> None:
    """The ResNet-18 step with each dynamic layer running the strategy that was fastest for its
    shape in :func:`resnet_layers`: what a per-layer rule could reach with these strategies."""
    for amp_dtype in (None, torch.bfloat16):
        best = BEST.get(str(amp_dtype or torch.float32))
        if not best:
            record("resnet18_step", model="dynamic best per layer", skipped="no layer measurements")
            continue
        torch.manual_seed(0)
        model = bench.resnet18(True)
        for m in model.modules():
            if isinstance(m, DynamicConv2d):
                m.strategy = best[m.out_channels]
        seconds = bench.time_train_step(model, RESNET["batch"], RESNET["size"], amp_dtype, RESNET["repeats"], DEVICE)
        ms = seconds * 1e3
        record("resnet18_step", model="dynamic best per layer", compiled=False, amp=str(amp_dtype),
               B=RESNET["batch"], ms=round(ms, 2), rule=best)


def resnet(budget: float, compiled: bool) -> None:
    """Every variant eagerly in float32 and bfloat16 autocast; or compiled under bfloat16
    (static first, then each dynamic variant) while the budget lasts."""
    variants = [("static", False, "auto")] + [(f"dynamic {s}", True, s) for s in STRATEGY_NAMES if runs_here(s)]
    if compiled:
        runs = [(v, True, torch.bfloat16) for v in variants]
    else:
        runs = [(v, False, amp) for v in variants for amp in (None, torch.bfloat16)]
    for (label, dynamic, strategy), compiled, amp_dtype in runs:
        if time.time() - START > budget:
            record("resnet18_step", model=label, compiled=compiled, amp=str(amp_dtype), skipped="time budget")
            continue
        torch.manual_seed(0)
        model = bench.resnet18(dynamic, strategy=strategy)
        if compiled:
            model = torch.compile(model)
        t0 = time.time()
        try:
            ms = 1e3 * bench.time_train_step(model, RESNET["batch"], RESNET["size"], amp_dtype, RESNET["repeats"],
                                             DEVICE)
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
            record("resnet18_step", model=label, compiled=compiled, amp=str(amp_dtype), B=RESNET["batch"],
                   ms=round(ms, 2), peak_GiB=round(peak, 2), wall_s=round(time.time() - t0, 1))
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one variant
            record("resnet18_step", model=label, compiled=compiled, amp=str(amp_dtype),
                   error=f"{type(exc).__name__}: {exc}"[:300])
        del model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which optional parts are skipped")
    parser.add_argument("--parts", default="correctness,sweep,fused,resnet,amp,compile,resnet_layers,resnet_best,"
                                           "resnet_compiled")
    parser.add_argument("--cpu-smoke", action="store_true", help="run every part on the CPU at toy sizes")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        SWEEP.update(cells=bench.QUICK_CELLS, batches=(1, 3), rounds=1)
        RESNET.update(batch=2, size=32, repeats=1)
        device = "cpu-smoke"
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        torch.backends.cudnn.benchmark = True
        device = torch.cuda.get_device_name()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    LOG.append((args.outdir / "gpu-log.jsonl").open("w"))
    record("env", device=device, torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
           strategies=list(STRATEGY_NAMES))
    parts = args.parts.split(",")
    for name, fn in (("correctness", correctness), ("sweep", sweep), ("fused", fused_detail),
                     ("resnet", lambda: resnet(args.budget, compiled=False)), ("amp", amp),
                     ("compile", compile_dynamic), ("resnet_layers", resnet_layers), ("resnet_best", resnet_best),
                     ("resnet_compiled", lambda: resnet(args.budget, compiled=True))):
        if name not in parts:
            continue
        if time.time() - START > args.budget:
            record(name, skipped="time budget")
            continue
        guarded(name, fn)
    date = datetime.date.today().isoformat()
    path = args.outdir / f"gpu-{device.replace(' ', '_')}-{date}.csv"
    fields = ["device", "torch", "date"] + sorted({k for row in ROWS for k in row} - {"device", "torch", "date"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in ROWS:
            writer.writerow({"device": device, "torch": torch.__version__, "date": date, **row})
    print(f"wrote {path} ({len(ROWS)} rows) in {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
