r"""Fused dynamic convolution on a CPU: the per-sample kernels are never written to memory.

The same idea as :mod:`dyconv_teach.kernels.triton_conv`, in C (``cpu_conv.c`` beside this
file) for a CPU's vector units. Each of the three products of a 2-D dynamic convolution is a
GEMM over the im2col rows of one sample (the output; the input gradient, then col2im; the
weight gradient of sample ``b``)::

    out_b[p, o]   = sum_r cols_b[p, r] * mixed_b[r, o]
    dcols_b[p, r] = sum_o grad_b[p, o] * mixed_b[o, r]
    G_b[o, r]     = sum_p grad_b[p, o] * cols_b[p, r]

and each mixes ``mixed_b = sum_j pi[b, j] * Theta_j`` one cache-sized tile at a time, just
before the tile is used, so the ``B`` per-sample kernels that batch-as-groups writes
(``[B*O, C/g, kH, kW]``, 72 MiB at ``C = 256``, ``B = 32``) never reach memory. The weight
gradient is reduced where each tile of ``G_b`` is made: ``dpi[b, j] += <G_b, Theta_j>`` and
``dTheta_j += pi[b, j] * G_b``, so ``G_b`` is not written either.

The library is compiled at first use with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) for the CPU it runs on (``-O3 -march=native``; for the baseline or AVX2
instruction sets where ``ATEN_CPU_CAPABILITY`` tells torch's own kernels to use them), once per
source, compiler and flags, into ``$DYCONV_TEACH_CACHE`` (default ``~/.cache/dyconv_teach``);
float32 and float64 each have their own build. With OpenMP (``-fopenmp``) the kernels run on
torch's own threads, ``torch.get_num_threads()`` of them. Results do not depend on the number of
threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._utils import output_shape

__all__ = ["compiler", "library", "fused_forward", "fused_backward", "DTYPES"]

SOURCE = Path(__file__).with_name("cpu_conv.c")
#: The dtypes the kernels are built for, with the C type of each build.
DTYPES = {torch.float32: "float", torch.float64: "double"}
Pair = Tuple[int, int]


def compiler() -> Optional[str]:
    """The C compiler the kernels are built with: ``$CC``, else the first of ``cc``, ``gcc`` and
    ``clang`` on the ``PATH``; ``None`` if there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


@functools.lru_cache(maxsize=None)
def library(dtype: torch.dtype) -> ctypes.CDLL:
    """The kernels for ``dtype`` (float32 or float64), compiled on first use and cached on disk.

    Raises ``RuntimeError`` naming the reason where no compiler is found or the build fails."""
    if dtype not in DTYPES:
        raise TypeError(f"the fused CPU kernels take float32 or float64 tensors, got {dtype}")
    cc = compiler()
    if cc is None:
        raise RuntimeError("the fused strategy on a CPU compiles its kernels with a C compiler, and none was found "
                           "(set CC, or install cc, gcc or clang)")
    source = SOURCE.read_bytes()
    base = [cc, "-O3", "-shared", "-fPIC", "-pthread", f"-DREAL={DTYPES[dtype]}"]
    arch = _ARCH.get(os.environ.get("ATEN_CPU_CAPABILITY", "").lower(), ["-march=native"])
    cache = Path(os.environ.get("DYCONV_TEACH_CACHE", Path.home() / ".cache" / "dyconv_teach"))
    cache.mkdir(parents=True, exist_ok=True)
    errors: List[str] = []
    # OpenMP shares torch's threads (its libgomp is loaded first, under the same name); a compiler
    # without OpenMP uses POSIX threads, one without -march=native builds for its default target.
    for flags in dict.fromkeys(tuple(f) for f in (["-fopenmp", *arch], arch, [])):
        key = hashlib.sha256(source + " ".join([*base, *flags]).encode()).hexdigest()[:16]
        target = cache / f"cpu_conv_{DTYPES[dtype]}_{key}.so"
        if not target.exists():
            # Built under a temporary name and renamed: another process never loads half a file.
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
            os.close(fd)
            run = subprocess.run([*base, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if run.returncode != 0:
                os.unlink(tmp)
                errors.append(run.stderr.strip())
                continue
            os.replace(tmp, target)
        lib = ctypes.CDLL(str(target))
        for name in ("dyconv_im2col", "dyconv_mixgemm", "dyconv_weightgrad"):
            getattr(lib, name).restype = None
        return lib
    raise RuntimeError(f"could not compile {SOURCE.name} with {cc}:\n" + "\n".join(errors))


#: Instruction sets by ``ATEN_CPU_CAPABILITY``: where torch's own kernels are told to use the baseline
#: or AVX2 (to run as another CPU would), these kernels are built for it too; else for this CPU.
_ARCH: Dict[str, List[str]] = {"default": [], "avx2": ["-mavx2", "-mfma"]}


def _call(dtype: torch.dtype, name: str, tensors: Sequence[Tensor], *sizes: int) -> None:
    getattr(library(dtype), name)(*(ctypes.c_void_p(t.data_ptr()) for t in tensors),
                                  *(ctypes.c_long(n) for n in sizes), ctypes.c_long(torch.get_num_threads()))


class _Conv:
    """The sizes of one call, after the checks."""

    def __init__(self, x: Tensor, weight: Tensor, stride: Pair, padding: Pair, dilation: Pair, groups: int) -> None:
        self.B, self.C, self.H, self.W = x.shape
        self.K, self.O, self.CG, self.KH, self.KW = weight.shape
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.OH, self.OW = output_shape(x.shape[2:], weight, stride, padding, dilation)
        self.P, self.OG = self.OH * self.OW, self.O // groups
        # The reduction length of one group's product, and of all groups' (an im2col row).
        self.R, self.RT = self.CG * self.KH * self.KW, self.C * self.KH * self.KW

    def cols(self, x: Tensor) -> Tensor:
        """im2col: ``[B, P, C*kH*kW]``, row ``p`` the receptive field of output pixel ``p``."""
        cols = x.new_empty(self.B, self.P, self.RT)
        _call(x.dtype, "dyconv_im2col", [x.permute(0, 2, 3, 1).contiguous(), cols], *self._geometry(), 1)
        return cols

    def image(self, cols: Tensor) -> Tensor:
        """col2im, the adjoint of :meth:`cols`: ``[B, C, H, W]`` (channels_last strides)."""
        image = cols.new_empty(self.B, self.H, self.W, self.C)
        _call(cols.dtype, "dyconv_im2col", [image, cols], *self._geometry(), 0)
        return image.permute(0, 3, 1, 2)

    def _geometry(self) -> Tuple[int, ...]:
        return (self.B, self.C, self.H, self.W, self.KH, self.KW, *self.stride, *self.padding, *self.dilation,
                self.OH, self.OW)


def _check(x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor]) -> None:
    tensors = [t for t in (x, weight, attention, bias) if t is not None]
    if any(t.device.type != "cpu" for t in tensors) or len({t.dtype for t in tensors}) != 1 or x.dtype not in DTYPES:
        raise TypeError("the fused CPU kernels take CPU tensors of one dtype, float32 or float64; got "
                        + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))


def fused_forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor],
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> Tensor:
    """Dynamic convolution ``out[b] = conv2d(x[b], sum_j attention[b, j] * weight[j], attention[b] @ bias)``
    for checked arguments (as :func:`dyconv_teach.functional.dynamic_conv2d` passes them): ``x``
    ``[B, C, H, W]``, ``weight`` ``[K, O, C/g, kH, kW]``, ``attention`` ``[B, K]``, ``bias``
    ``[K, O]`` or ``None``, CPU tensors of one dtype, float32 or float64. Returns
    ``[B, O, H', W']`` in channels_last strides. Not differentiable by itself: see
    :func:`fused_backward`."""
    _check(x, weight, attention, bias)
    s = _Conv(x, weight, stride, padding, dilation, groups)
    out = x.new_empty(s.B, s.P, s.O)
    bank_t = weight.reshape(s.K, s.O, s.R).transpose(1, 2).contiguous()  # [K, R, O]: o innermost
    _call(x.dtype, "dyconv_mixgemm", [s.cols(x), bank_t, attention.contiguous(), out],
          s.B, s.K, s.R, s.OG, s.P, groups, s.P * s.RT, s.RT, s.R * s.O, s.O, s.OG, s.P * s.O, s.O)
    out = out.view(s.B, s.OH, s.OW, s.O).permute(0, 3, 1, 2)
    return out if bias is None else out + (attention @ bias)[:, :, None, None]


def fused_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor],
    stride: Pair, padding: Pair, dilation: Pair, groups: int, output_mask: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`fused_forward` with respect to ``(x, weight, attention, bias)``; a
    gradient is ``None`` where its entry of ``output_mask`` is False (``bias``'s also where
    ``bias`` is None). The input's im2col rows are computed again, not kept from the forward."""
    _check(x, weight, attention, bias)
    s = _Conv(x, weight, stride, padding, dilation, groups)
    need_x, need_bank, need_pi, need_bias = (bool(v) for v in output_mask)
    grad = grad_out.permute(0, 2, 3, 1).contiguous()  # [B, H', W', O]: o innermost
    pi = attention.contiguous()
    bank = weight.contiguous()
    grad_x = grad_bank = grad_pi = grad_bias = None
    if need_x:
        cols = x.new_empty(s.B, s.P, s.RT)
        _call(x.dtype, "dyconv_mixgemm", [grad, bank, pi, cols],
              s.B, s.K, s.OG, s.R, s.P, groups, s.P * s.O, s.O, s.O * s.R, s.R, s.OG * s.R, s.P * s.RT, s.RT)
        grad_x = s.image(cols)
    if need_bank or need_pi:
        grad_bank, grad_pi = torch.empty_like(bank), x.new_empty(s.B, s.K)
        _call(x.dtype, "dyconv_weightgrad", [grad, s.cols(x), bank, pi, grad_bank, grad_pi],
              s.B, s.K, s.OG, s.R, s.P, groups, s.P * s.O, s.O, s.P * s.RT, s.RT)
    if bias is not None and (need_pi or need_bias):
        grad_sum = grad_out.sum(dim=(2, 3))  # [B, O]
        if need_pi:
            grad_pi = grad_pi + grad_sum @ bias.T  # type: ignore[operator]
        if need_bias:
            grad_bias = attention.T @ grad_sum
    return (grad_x, grad_bank if need_bank else None, grad_pi if need_pi else None, grad_bias)
