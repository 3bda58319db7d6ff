"""Compile the fused Triton kernels for an NVIDIA Hopper GPU on a machine without one.

    python tools/check_triton_compile.py           # every tile the autotuner would try, 4 dtypes, 3 layers
    python tools/check_triton_compile.py --quick   # one layer, bfloat16 and float32, a few tiles

Collects the kernel launches that ``dyconv_teach.kernels.triton_conv`` makes for one forward and one
full backward of a few ResNet-like layers (K = 4, 3x3), compiles each with every config the
autotuner would try there, for sm_90a (H100/H200) with the ptxas bundled in the triton wheel,
and prints per config: registers per thread, local memory per thread (register spills) and
shared memory per program, read from the cubin. Exits with status 1 if a config fails to
compile. Under Triton's interpreter nothing is compiled: run it with TRITON_INTERPRET unset.
It uses Triton's ahead-of-time interface (``ASTSource``, ``triton.compile``), checked with triton 3.7.1
(torch 2.13's) and 3.9.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dyconv_teach.kernels import triton_conv as tc

LAYERS = [(64, 56, 1), (128, 56, 2), (512, 7, 1)]  # (C = O, H = W, stride)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
POINTER_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32"}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

def collect_launches(channels: int, size: int, stride: int, dtype: torch.dtype) -> List[tc.Launch]:
    """(kernel name, arguments, constexprs) of the launches of one forward and one backward."""
    with tc.record_launches() as launches:
        x = torch.randn(2, channels, size, size, dtype=dtype)
        weight = torch.randn(4, channels, channels, 3, 3, dtype=dtype)
        attention, bias = torch.randn(2, 4, dtype=dtype), torch.randn(4, channels, dtype=dtype)
        conv = ((stride, stride), (1, 1), (1, 1), 1)
        out = tc.fused_forward(x, weight, attention, bias, *conv)
        tc.fused_backward(torch.randn_like(out), x, weight, attention, bias, *conv, (True, True, True, True))
    return launches


def configs_to_try(name: str, args: Tuple[Any, ...]) -> List[triton.Config]:
    """The configs the autotuner keeps for these arguments (its early pruning)."""
    tuned = tc.KERNELS[name].tuned
    return tuned.early_config_prune(tuned.configs, dict(zip(tuned.arg_names, args)))


def compile_config(name: str, args: Tuple[Any, ...], constexprs: Dict[str, Any], config: triton.Config,
                   arch: int) -> Any:
    kernel = tc.KERNELS[name].jit
    constants = {**constexprs, **config.kwargs}
    signature, attrs = {}, {}
    values = dict(zip(kernel.arg_names, args))
    for index, arg in enumerate(kernel.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
            continue
        value = values[arg]
        if isinstance(value, torch.Tensor):
            signature[arg] = "*" + POINTER_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[arg] = "i32"
            if arg not in tc.GEOMETRY_ARGS and value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, {k: constants[k] for k in kernel.arg_names if k in constants}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resources(compiled: Any) -> str:
    """Registers and local memory per thread (cuobjdump), shared memory per program."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", cubin.name], capture_output=True, text=True).stdout
    reg, local = (re.search(rf"{field}:(\d+)", usage) for field in ("REG", "LOCAL"))
    return (f"regs {reg.group(1) if reg else '?':>3}  local {local.group(1) if local else '?':>4} B  "
            f"shared {compiled.metadata.shared // 1024:>3} KiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one layer, bfloat16 and float32, a few tiles")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (default 90: H100/H200)")
    options = parser.parse_args()
    if tc.INTERPRETED:
        print("TRITON_INTERPRET is set: nothing would be compiled", file=sys.stderr)
        return 2
    layers = LAYERS[:1] if options.quick else LAYERS
    dtypes = ["bfloat16", "float32"] if options.quick else list(DTYPES)
    failures = 0
    for channels, size, stride in layers:
        for dtype_name in dtypes:
            for name, args, constexprs in collect_launches(channels, size, stride, DTYPES[dtype_name]):
                configs = configs_to_try(name, args)
                if options.quick:  # the first tile, and one with two samples per program
                    configs = configs[:1] + [c for c in configs if c.kwargs.get("SAMPLES") == 2][:1]
                for config in configs:
                    label = (f"C={channels:<3} {size:>2}x{size:<2} s{stride} {dtype_name:8} {name:10} "
                             f"{config.kwargs} warps {config.num_warps} stages {config.num_stages}")
                    try:
                        print(f"{label}: {resources(compile_config(name, args, constexprs, config, options.arch))}",
                              flush=True)
                    except Exception as error:  # report every failing config, then fail
                        failures += 1
                        print(f"{label}: FAILED {type(error).__name__}: {error}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's default; silences its warning
    sys.exit(main())
