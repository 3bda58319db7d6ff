r"""Fused dynamic convolution in Triton: the per-sample kernels are never written to memory.

Needs the ``gpu`` extra (``pip install .[gpu]``, i.e. Triton). The core imports this
module only when the ``fused`` strategy runs (:mod:`dyconv_teach.strategies`); the
kernels are 2-D only. They run on CUDA tensors, and
on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is first imported), which is how the tests check them without a GPU;
the interpreter uses fixed small tiles (``_INTERPRETER_META``).

The picture: convolution as an implicit GEMM
--------------------------------------------
For one sample ``b`` and one group, a convolution is a matrix product

    out_b[p, o] = sum_r A_b[p, r] * mixed_b[r, o]

with ``p`` an output pixel ``(oh, ow)``, ``o`` an output channel and ``r`` a
reduction index ``(kh, kw, c)``: one kernel tap and one input channel.
``A_b`` is the im2col matrix, ``A_b[p, (kh, kw, c)] = x[b, c, oh*sh - ph +
kh*dh, ow*sw - pw + kw*dw]`` (zero outside the image). It is *implicit*: no
kernel here builds it; each program computes the addresses of the tile it
needs and loads that tile straight from ``x``.

In dynamic convolution ``mixed_b = sum_j pi[b, j] * Theta_j`` (the book's
mixed kernel of sample ``b``). Batch-as-groups writes all ``B`` of them,
``[B, O, C/g, kH, kW]``, to memory and reads them back; at ``C = 512`` and
``B = 256`` that is 2.3 GB in float32. Here the
mixing happens where the GEMM consumes the weight: a program that owns an
output tile ``[BLOCK_M pixels, BLOCK_N channels]`` walks the reduction in
chunks of ``BLOCK_K`` (one tap, ``BLOCK_K`` input channels). For each chunk it
loads the ``K`` bank tiles ``[BLOCK_K, BLOCK_N]``, mixes them in registers with
``pi[b]`` (``K`` fused multiply-adds per weight, in float32), rounds the mix
to the input dtype and feeds it with the ``A`` tile to ``tl.dot`` (tensor
cores: bf16/fp16, TF32 for float32 when ``torch.backends.cudnn.allow_tf32``,
as cuDNN does; float32 accumulators, float64 for float64 input).

Where the cost goes. A program mixes each weight element once per chunk and
uses it for the ``BLOCK_M`` pixels of its tile, so mixing adds ``K / BLOCK_M``
FMAs (on the ordinary cores) per tensor-core multiply-add, and the program
reads ``K`` bank tiles where a static convolution reads one. Deep layers are
the hard case: a 7x7 map has only 49 pixels per sample, so ``BLOCK_M`` cannot
usefully exceed 64 and every sample re-reads the whole bank. A program may
therefore own ``SAMPLES = 2`` samples: it loads each bank tile once and mixes
it twice, halving the bank traffic per multiply-add. Large maps prefer
``BLOCK_M = 128`` or ``256`` with one sample.

Tiles. ``triton.autotune`` times a few tiles per layer shape and batch size
(``_GEMM_TILES``, ``_BANK_GRAD_TILES``), after dropping tiles much
larger than the layer. They were chosen by compiling for sm_90a
(``tools/check_triton_compile.py``): every one fits the shared memory of an
H100 (at most 208 KiB, float32 with two samples) and compiles without spilling
registers, though most use 230-255 of them per thread (the float32
accumulators of a ``128 x 128`` tile alone take 64 per thread with 8 warps). The bank-gradient tiles are smaller
because each program keeps ``2K + 1`` tiles of ``[BLOCK_O, BLOCK_R]`` values in
registers. Which tile wins where is a measurement still to be made on a GPU.

Layouts. ``x`` and ``grad_out`` are read as channels_last (converted if they
are not), so that the reduction over channels loads contiguous vectors; the
bank is copied once per call to ``[K, kH*kW, C/g, O]``, output channel
fastest. Outputs are written straight into the caller's memory format.
Integer arguments that vary between layers (batch, image and kernel sizes,
strides) are exempt from Triton's specialisation, so the layers of a network
share one compiled kernel per dtype and tile.

Backward
--------
*Input gradient.* ``grad_x[b] = conv_transpose(grad_out[b], mixed_b)``, the same
implicit GEMM with the roles swapped: rows are input pixels, columns input
channels, the reduction runs over ``(tap, o)``, and the weight tile
``mixed_b[o, c]`` for that tap is mixed on the fly exactly as in the forward. With
stride ``s > 1`` an input pixel meets only the taps ``kh`` with
``(ih + ph - kh*dh) % s == 0``; the kernel splits the input pixels into their
``sh*sw`` phases ``(ih % sh, iw % sw)`` so that every pixel of a program
shares the same taps, and loops over those taps only (no multiply-adds spent
on taps that cannot contribute).

*Bank and attention gradients.* With ``dmixed_b[o, r] = sum_p grad_out[b, o, p] *
A_b[p, r]`` (the ordinary weight gradient of sample ``b``):

    grad_bank[j] = sum_b pi[b, j] * dmixed_b,        grad_pi[b, j] = <dmixed_b, Theta_j>.

A program owns a tile ``[BLOCK_O, BLOCK_R]`` of ``(o, r)`` and a chunk of
samples. For each sample it reduces ``dmixed_b``'s tile over the pixels with
``tl.dot``, then, still in registers, adds ``pi[b, j] * dmixed_b`` to ``K``
accumulators ``[K, BLOCK_O, BLOCK_R]`` and takes the ``K`` dot products with
the bank tile, which it loaded once. ``dmixed_b`` is never stored. Per-chunk bank
partials and per-tile attention partials are written to buffers and summed by
torch in a fixed order (no atomics), so results are reproducible. The chunk
count is chosen so that tiles times chunks fill the GPU.

*Bias.* ``b_eff = pi @ bias``, so ``grad_bias = pi^T @ gsum`` and
``grad_pi += gsum @ bias^T`` with ``gsum[b, o] = sum_p grad_out[b, o, p]``:
small reductions left to torch.

Never materialised: the per-sample weights ``[B, O, C/g, kH, kW]``, their
gradients, and the im2col matrix. The bank is copied once per call into the
layout the kernels read, ``[K, kH*kW, C/g, O]`` (output channel fastest).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .._utils import check_conv_args, check_output_shape, check_tensors, memory_format, ntuple

__all__ = ["fused_forward", "fused_backward", "mixed_step", "Kernel", "KERNELS", "GEOMETRY_ARGS", "INTERPRETED",
           "Launch", "record_launches", "chosen_tiles"]

Pair = Tuple[int, int]


# --------------------------------------------------------------------------- kernels


@triton.jit
def _program_tile(N_SIZE, M_SIZE, PHASES, GROUPS, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  SAMPLES: tl.constexpr):
    """This program's column tile (varying fastest), row tile, stride phase, group and first sample."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N_SIZE, BLOCK_N)
    m_tiles = tl.cdiv(M_SIZE, BLOCK_M)
    rest = pid // n_tiles // m_tiles
    return pid % n_tiles, pid // n_tiles % m_tiles, rest % PHASES, rest // PHASES % GROUPS, \
        rest // PHASES // GROUPS * SAMPLES


@triton.jit
def mixed_step(
    acc0, acc1, a0_ptrs, a1_ptrs, a0_mask, a1_mask, w_ptrs, w_mask, bank_stride, pi_ptr, b0, ok0, ok1,
    NK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, SAMPLES: tl.constexpr,
):
    """One reduction chunk for sample b0 and, with two samples a program, b0 + 1. Mix the weight tile
    ``sum_j pi[b, j] * bank_j`` from the K bank tiles at ``w_ptrs + j * bank_stride``
    (loaded once for both samples), round it to the input dtype, and add
    the product of the A tile at ``a_ptrs`` and the mixed tile to ``acc``."""
    w0 = tl.zeros(w_ptrs.shape, ACC)
    w1 = tl.zeros(w_ptrs.shape, ACC)
    for j in tl.static_range(NK):
        bank_tile = tl.load(w_ptrs + j * bank_stride, mask=w_mask, other=0).to(ACC)
        w0 += tl.load(pi_ptr + b0 * NK + j, mask=ok0, other=0).to(ACC) * bank_tile
        if SAMPLES == 2:
            w1 += tl.load(pi_ptr + (b0 + 1) * NK + j, mask=ok1, other=0).to(ACC) * bank_tile
    dtype = a0_ptrs.dtype.element_ty
    a0 = tl.load(a0_ptrs, mask=a0_mask, other=0)
    acc0 = tl.dot(a0.to(DOT), w0.to(dtype).to(DOT), acc0, input_precision=PREC, out_dtype=ACC)
    if SAMPLES == 2:
        a1 = tl.load(a1_ptrs, mask=a1_mask, other=0)
        acc1 = tl.dot(a1.to(DOT), w1.to(dtype).to(DOT), acc1, input_precision=PREC, out_dtype=ACC)
    return acc0, acc1


# Sizes that vary from layer to layer are not specialised on (divisibility by 16, equality
# to 1), so that the layers of a network share compiled kernels; channel counts and
# strides are, since they decide how wide the loads can be.
#: The integer arguments of the kernels that Triton does not specialise on.
GEOMETRY_ARGS = ("B", "H", "W", "OH", "OW", "HQ", "WQ", "M_SIZE", "GROUPS", "CHUNK", "KW", "NTAPS",
                 "SH", "SW", "PH", "PW", "DH", "DW")


def _jit(fn: Any) -> Any:
    """``triton.jit`` without specialisation on the geometry arguments that ``fn`` has."""
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in GEOMETRY_ARGS if n in names])


@_jit
def _forward_kernel(
    x_ptr, bank_ptr, pi_ptr, beff_ptr, out_ptr,
    B, H, W, OH, OW, M_SIZE, CG, OG, O, GROUPS,
    sxb, sxc, sxh, sxw, sob, soc, soh, sow,
    KW, NTAPS, SH, SW, PH, PW, DH, DW,
    NK: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLES: tl.constexpr,
):
    # One program: output pixels [BLOCK_M] x output channels [BLOCK_N] of group gi,
    # for SAMPLES consecutive samples. Channel tiles vary fastest, so programs
    # reading the same input tile run side by side.
    pid_n, pid_m, _, gi, b0 = _program_tile(OG, M_SIZE, 1, GROUPS, BLOCK_N, BLOCK_M, SAMPLES)
    ok0 = b0 < B
    ok1 = b0 + 1 < B
    x0 = x_ptr + b0.to(tl.int64) * sxb
    x1 = x0 + sxb

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Rows of each sample, none for a sample past the batch. (Masks combine blocks
    # only: the interpreter mishandles a block & a scalar.)
    m_ok0 = m < M_SIZE * ok0.to(tl.int32)
    m_ok1 = m < M_SIZE * ok1.to(tl.int32)
    oh = m // OW
    ow = m % OW
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < OG
    o = gi * OG + n
    rk = tl.arange(0, BLOCK_K)

    acc0 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    c_chunks = tl.cdiv(CG, BLOCK_K)
    for it in range(NTAPS * c_chunks):
        tap = it // c_chunks
        c = (it - tap * c_chunks) * BLOCK_K + rk
        c_ok = c < CG
        kh = tap // KW
        kw = tap - kh * KW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_off = (ih * sxh + iw * sxw)[:, None] + ((gi * CG + c) * sxc)[None, :]
        # Weight tile mixed_b[c, o] of this tap.
        w_ptrs = bank_ptr + tap * (CG * O) + c[:, None] * O + o[None, :]
        acc0, acc1 = mixed_step(
            acc0, acc1, x0 + a_off, x1 + a_off, (m_ok0 & inside)[:, None] & c_ok[None, :],
            (m_ok1 & inside)[:, None] & c_ok[None, :], w_ptrs, c_ok[:, None] & n_ok[None, :], NTAPS * CG * O,
            pi_ptr, b0, ok0, ok1, NK, ACC, DOT, PREC, SAMPLES)

    out_off = (oh * soh + ow * sow)[:, None] + (o * soc)[None, :]
    if HAS_BIAS:
        acc0 += tl.load(beff_ptr + b0 * O + o, mask=n < OG * ok0.to(tl.int32), other=0).to(ACC)[None, :]
    tl.store(out_ptr + b0.to(tl.int64) * sob + out_off, acc0.to(out_ptr.dtype.element_ty),
             mask=m_ok0[:, None] & n_ok[None, :])
    if SAMPLES == 2:
        if HAS_BIAS:
            acc1 += tl.load(beff_ptr + (b0 + 1) * O + o, mask=n < OG * ok1.to(tl.int32), other=0).to(ACC)[None, :]
        tl.store(out_ptr + (b0 + 1).to(tl.int64) * sob + out_off, acc1.to(out_ptr.dtype.element_ty),
                 mask=m_ok1[:, None] & n_ok[None, :])


@_jit
def _input_grad_kernel(
    g_ptr, bank_ptr, pi_ptr, taps_ptr, ntaps_ptr, dx_ptr,
    B, H, W, OH, OW, HQ, WQ, M_SIZE, CG, OG, O, GROUPS,
    sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
    KW, NTAPS, SH, SW, PH, PW, DH, DW,
    NK: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SAMPLES: tl.constexpr,
):
    # One program: BLOCK_M input pixels of one stride phase (ih % SH, iw % SW) x
    # BLOCK_N input channels of group gi, for SAMPLES consecutive samples.
    pid_n, pid_m, phase, gi, b0 = _program_tile(CG, M_SIZE, SH * SW, GROUPS, BLOCK_N, BLOCK_M, SAMPLES)
    ok0 = b0 < B
    ok1 = b0 + 1 < B
    g0 = g_ptr + b0.to(tl.int64) * sgb
    g1 = g0 + sgb

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ih = phase // SW + (m // WQ) * SH
    iw = phase % SW + (m % WQ) * SW
    m_ok0 = (m < M_SIZE * ok0.to(tl.int32)) & (ih < H) & (iw < W)
    m_ok1 = (m < M_SIZE * ok1.to(tl.int32)) & (ih < H) & (iw < W)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < CG
    rk = tl.arange(0, BLOCK_K)

    acc0 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    o_chunks = tl.cdiv(OG, BLOCK_K)
    n_taps = tl.load(ntaps_ptr + phase)
    for it in range(n_taps * o_chunks):
        t = it // o_chunks
        o = gi * OG + (it - t * o_chunks) * BLOCK_K + rk
        o_ok = o < (gi + 1) * OG
        tap = tl.load(taps_ptr + phase * NTAPS + t)
        kh = tap // KW
        kw = tap - kh * KW
        # Exact divisions: every pixel of this phase has the same remainder.
        oh = (ih + PH - kh * DH) // SH
        ow = (iw + PW - kw * DW) // SW
        inside = (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a_off = (oh * sgh + ow * sgw)[:, None] + (o * sgc)[None, :]
        # Weight tile mixed_b[o, c] of this tap (the forward's tile, transposed).
        w_ptrs = bank_ptr + tap * (CG * O) + n[None, :] * O + o[:, None]
        acc0, acc1 = mixed_step(
            acc0, acc1, g0 + a_off, g1 + a_off, (m_ok0 & inside)[:, None] & o_ok[None, :],
            (m_ok1 & inside)[:, None] & o_ok[None, :], w_ptrs, o_ok[:, None] & n_ok[None, :], NTAPS * CG * O,
            pi_ptr, b0, ok0, ok1, NK, ACC, DOT, PREC, SAMPLES)

    # Every pixel of the phase is written, zeros where no tap reaches it.
    dx_off = (ih * sdh + iw * sdw)[:, None] + ((gi * CG + n) * sdc)[None, :]
    tl.store(dx_ptr + b0.to(tl.int64) * sdb + dx_off, acc0.to(dx_ptr.dtype.element_ty),
             mask=m_ok0[:, None] & n_ok[None, :])
    if SAMPLES == 2:
        tl.store(dx_ptr + (b0 + 1).to(tl.int64) * sdb + dx_off, acc1.to(dx_ptr.dtype.element_ty),
                 mask=m_ok1[:, None] & n_ok[None, :])


@_jit
def _bank_grad_kernel(
    x_ptr, g_ptr, bank_ptr, pi_ptr, gbank_ptr, gpi_ptr,
    B, H, W, OH, OW, M_SIZE, CG, OG, O, GROUPS, CHUNK,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    KW, NTAPS, SH, SW, PH, PW, DH, DW,
    NK: tl.constexpr, NKP: tl.constexpr, NEED_BANK: tl.constexpr, NEED_PI: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # One program: a tile of output channels [BLOCK_O] x one tap and BLOCK_R input
    # channels of group gi, for the samples [b_start, b_end) of one batch chunk.
    pid = tl.program_id(0)
    o_tiles = tl.cdiv(OG, BLOCK_O)
    c_chunks = tl.cdiv(CG, BLOCK_R)
    pid_o = pid % o_tiles
    rest = pid // o_tiles
    pid_r = rest % (NTAPS * c_chunks)
    rest = rest // (NTAPS * c_chunks)
    gi = rest % GROUPS
    chunk = rest // GROUPS
    # This tile's slot among all (o, r, group) tiles, for the attention partials.
    slot = pid % (o_tiles * NTAPS * c_chunks * GROUPS)
    b_start = chunk * CHUNK
    b_end = tl.minimum(b_start + CHUNK, B)

    tap = pid_r // c_chunks
    kh = tap // KW
    kw = tap - kh * KW
    o = gi * OG + pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < (gi + 1) * OG
    c = (pid_r - tap * c_chunks) * BLOCK_R + tl.arange(0, BLOCK_R)
    c_ok = c < CG
    kk = tl.arange(0, NKP)
    k_ok = kk < NK
    rp = tl.arange(0, BLOCK_P)

    # The K bank tiles [K, BLOCK_O, BLOCK_R] of this tap, loaded once.
    tile_off = o[:, None] + c[None, :] * O
    tile_mask = o_ok[:, None] & c_ok[None, :]
    bank = tl.load(bank_ptr + kk[:, None, None] * (NTAPS * CG * O) + tap * (CG * O) + tile_off[None, :, :],
                   mask=k_ok[:, None, None] & tile_mask[None, :, :], other=0).to(ACC)
    gbank = tl.zeros([NKP, BLOCK_O, BLOCK_R], ACC)
    dw = tl.zeros([BLOCK_O, BLOCK_R], ACC)
    p_chunks = tl.cdiv(M_SIZE, BLOCK_P)
    # One flat loop over (sample, pixel chunk), so that it pipelines across samples
    # when a sample has a single pixel chunk (deep layers).
    for it in range((b_end - b_start) * p_chunks):
        b = b_start + it // p_chunks
        pc = it % p_chunks
        p = pc * BLOCK_P + rp
        oh = p // OW
        ow = p % OW
        ih = oh * SH - PH + kh * DH
        iw = ow * SW - PW + kw * DW
        p_ok = p < M_SIZE
        g_t = tl.load(g_ptr + b.to(tl.int64) * sgb + (o * sgc)[:, None] + (oh * sgh + ow * sgw)[None, :],
                      mask=o_ok[:, None] & p_ok[None, :], other=0)
        a_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_ptr + b.to(tl.int64) * sxb + (ih * sxh + iw * sxw)[:, None] + ((gi * CG + c) * sxc)[None, :],
                    mask=a_ok[:, None] & c_ok[None, :], other=0)
        dw = tl.dot(g_t.to(DOT), a.to(DOT), dw, input_precision=PREC, out_dtype=ACC)
        if pc == p_chunks - 1:
            # dmixed_b's tile is complete: fold it into the bank and attention gradients.
            if NEED_BANK:
                pi_b = tl.load(pi_ptr + b * NK + kk, mask=k_ok, other=0).to(ACC)
                gbank += pi_b[:, None, None] * dw[None, :, :]
            if NEED_PI:
                gpi = tl.sum(tl.sum(bank * dw[None, :, :], axis=2), axis=1)
                tl.store(gpi_ptr + (slot.to(tl.int64) * B + b) * NK + kk, gpi, mask=k_ok)
            dw = tl.zeros([BLOCK_O, BLOCK_R], ACC)

    if NEED_BANK:
        # Partial of this chunk, laid out [chunk, K, O, C/g, kH*kW] like the weight.
        ptrs = gbank_ptr + chunk.to(tl.int64) * (NK * O * CG * NTAPS) + kk[:, None, None] * (O * CG * NTAPS) \
            + (o[:, None] * (CG * NTAPS) + c[None, :] * NTAPS + tap)[None, :, :]
        tl.store(ptrs, gbank, mask=k_ok[:, None, None] & tile_mask[None, :, :])


# --------------------------------------------------------------------------- launch configurations

#: True when Triton runs the kernels in its interpreter (``TRITON_INTERPRET=1``, CPU tensors).
INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)

# Meta-parameters under the interpreter (CPU tensors): small tiles, so that the
# tests' small shapes span several tiles, reduction chunks and sample pairs.
_INTERPRETER_META: Dict[str, Dict[str, int]] = {
    "forward": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "SAMPLES": 2},
    "input_grad": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "SAMPLES": 2},
    "bank_grad": {"BLOCK_O": 16, "BLOCK_R": 16, "BLOCK_P": 16},
}

# Tiles tried on a GPU (written for H100/H200). Forward and input gradient:
# (BLOCK_M, BLOCK_N, BLOCK_K, SAMPLES, warps, stages). Large maps want many rows per
# program (fewer bank re-reads per multiply-add); small maps (7x7, 14x14) want
# SAMPLES = 2, which reads each bank tile once for two samples. The last tile is for
# float64 alone, whose tiles take twice the shared memory.
_GEMM_TILES = [
    (128, 128, 32, 1, 8, 3),
    (128, 64, 32, 1, 4, 3),
    (256, 64, 32, 1, 8, 3),
    (64, 128, 32, 1, 4, 3),
    (64, 64, 32, 1, 4, 4),
    (64, 64, 32, 2, 4, 3),
    (64, 128, 32, 2, 8, 3),
    (32, 32, 16, 1, 4, 2),
]
# Bank gradient: (BLOCK_O, BLOCK_R, BLOCK_P, warps, stages). The K accumulators
# [K, BLOCK_O, BLOCK_R] and the bank tile stay in registers, hence modest tiles.
# The last tile again for float64 alone.
_BANK_GRAD_TILES = [
    (64, 64, 32, 8, 3),
    (64, 32, 64, 8, 3),
    (32, 64, 64, 8, 3),
    (128, 32, 32, 8, 3),
    (32, 32, 64, 4, 3),
    (32, 32, 32, 4, 2),
]


def _pruner(n_arg: Optional[str]) -> Any:
    """Configs to try: the float64 tile for float64; else the others, without tiles much larger
    than the layer (rows past a sample's pixels, columns past ``n_arg`` channels)."""

    def prune(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs: Any) -> List[triton.Config]:
        if any(isinstance(v, Tensor) and v.dtype == torch.float64 for v in named_args.values()):
            return configs[-1:]
        configs = configs[:-1]
        if n_arg is None:
            return configs
        m_cap = max(64, triton.next_power_of_2(named_args["M_SIZE"]))
        n_cap = max(64, triton.next_power_of_2(named_args[n_arg]))
        return [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap]

    return prune


def _quick_bench(kernel_call: Any, quantiles: Any) -> Any:
    """Autotuning timer: shorter than Triton's default (25 ms warm-up, 100 ms measured) per config."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SAMPLES": s}, num_warps=w, num_stages=st)
    for m, n, k, s, w, st in _GEMM_TILES
]
_GEMM_KEY = ["B", "M_SIZE", "CG", "OG", "NTAPS", "GROUPS", "NK"]
_TUNED = {
    "forward": triton.autotune(
        configs=_GEMM_CONFIGS, key=_GEMM_KEY, prune_configs_by={"early_config_prune": _pruner("OG")},
        do_bench=_quick_bench,
    )(_forward_kernel),
    "input_grad": triton.autotune(
        configs=_GEMM_CONFIGS, key=_GEMM_KEY, prune_configs_by={"early_config_prune": _pruner("CG")},
        do_bench=_quick_bench,
    )(_input_grad_kernel),
    "bank_grad": triton.autotune(
        configs=[
            triton.Config({"BLOCK_O": o, "BLOCK_R": r, "BLOCK_P": p}, num_warps=w, num_stages=st)
            for o, r, p, w, st in _BANK_GRAD_TILES
        ],
        key=[*_GEMM_KEY, "CHUNK", "NEED_BANK", "NEED_PI"], prune_configs_by={"early_config_prune": _pruner(None)},
        # A config with smaller tiles writes attention-partial slots that another leaves alone.
        reset_to_zero=["gpi_ptr"], do_bench=_quick_bench,
    )(_bank_grad_kernel),
}
_RAW = {"forward": _forward_kernel, "input_grad": _input_grad_kernel, "bank_grad": _bank_grad_kernel}


class Kernel(NamedTuple):
    """One of the three kernels: the ``triton.jit`` function and its autotuned wrapper."""

    jit: Any
    tuned: Any


#: The three kernels (``forward``, ``input_grad`` and ``bank_grad``) by name.
KERNELS: Dict[str, Kernel] = {name: Kernel(_RAW[name], _TUNED[name]) for name in _RAW}

#: A launch as recorded by :func:`record_launches`, ``(kernel name, arguments in order, constexprs)``
#: (the constexprs without the tile's).
Launch = Tuple[str, Tuple[Any, ...], Dict[str, Any]]
_recording: Optional[List[Launch]] = None


@contextlib.contextmanager
def record_launches() -> Iterator[List[Launch]]:
    """Within this context the kernels do not run: each launch is appended to the yielded list
    instead (outputs stay uninitialised). ``tools/check_triton_compile.py`` compiles what it
    collects for a GPU the machine does not have."""
    global _recording
    _recording, previous = [], _recording
    try:
        yield _recording
    finally:
        _recording = previous


def chosen_tiles() -> Dict[str, str]:
    """The tile the autotuner chose last, per kernel (``'None'`` before any tuned launch)."""
    return {name: str(getattr(kernel.tuned, "best_config", None)) for name, kernel in KERNELS.items()}


def _launch(name: str, grid: Any, args: Sequence[Any], constexprs: Dict[str, Any]) -> None:
    """Run kernel ``name``: autotuned when compiled, with the fixed small tiles under the interpreter."""
    if _recording is not None:
        _recording.append((name, tuple(args), constexprs))
        return
    device = args[0].device
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"the tensors are on {device}: the fused kernels run on CUDA tensors, or on CPU tensors "
                         f"under Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported)")
    if INTERPRETED:
        _RAW[name][grid](*args, **constexprs, **_INTERPRETER_META[name])
    else:
        _TUNED[name][grid](*args, **constexprs)


def _bank_grad_tiles(s: "_Conv", largest: bool) -> int:
    """How many (o, r, group) tiles the bank-gradient kernel has with its smallest tiles (the
    attention partials need one slot each) or its largest (to choose the batch chunks)."""
    if INTERPRETED:
        sizes = [(_INTERPRETER_META["bank_grad"]["BLOCK_O"], _INTERPRETER_META["bank_grad"]["BLOCK_R"])]
    else:
        sizes = [(t[0], t[1]) for t in _BANK_GRAD_TILES]
    block_o, block_r = (max if largest else min)(sizes, key=lambda t: t[0] * t[1])
    return triton.cdiv(s.OG, block_o) * s.KH * s.KW * triton.cdiv(s.CG, block_r) * s.groups


# --------------------------------------------------------------------------- host side


class _Conv(NamedTuple):
    """Sizes of one call, checked."""

    B: int
    C: int
    H: int
    W: int
    K: int
    O: int
    CG: int
    OG: int
    KH: int
    KW: int
    OH: int
    OW: int
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def _check(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor],
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> _Conv:
    """Validate the arguments of :func:`fused_forward` / :func:`fused_backward`; return the sizes."""
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints (the caller resolves {padding!r}), got {padding!r}")
    if x.dim() == 4 and weight.dim() == 5:
        check_conv_args(2, x.shape[1], weight.shape[1], groups, stride, padding, dilation)
    stride_ = ntuple("stride", stride, 2, 1)
    padding_ = ntuple("padding", padding, 2, 0)
    dilation_ = ntuple("dilation", dilation, 2, 1)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C, H, W], got {x.dim()}-D input of shape {tuple(x.shape)}")
    check_tensors(x, weight, attention, bias, groups)
    if x.dtype not in _TL_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; the fused kernels take {', '.join(map(str, _TL_DTYPES))}")
    if min(weight.shape) < 1:
        raise ValueError(f"weight {tuple(weight.shape)} must have every dimension >= 1")
    B, C, H, W = x.shape
    K, O, CG, KH, KW = weight.shape
    OH, OW = check_output_shape((H, W), weight, stride_, padding_, dilation_)
    return _Conv(B, C, H, W, K, O, CG, O // groups, KH, KW, OH, OW, stride_, padding_, dilation_, groups)  # type: ignore[arg-type]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(x: Tensor) -> Dict[str, Any]:
    """The kernels' dtype constexprs: accumulator, ``tl.dot`` operands, ``tl.dot`` input precision."""
    dot = _TL_DTYPES[x.dtype]
    if INTERPRETED and x.dtype == torch.bfloat16:
        # The interpreter's tl.dot multiplies bfloat16 bit patterns (it holds them as
        # uint16); float32 operands give the same products exactly.
        dot = tl.float32
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"ACC": _TL_DTYPES[_acc_dtype(x.dtype)], "DOT": dot, "PREC": "tf32" if tf32 else "ieee"}


def _nhwc(t: Tensor) -> Tensor:
    """``t`` in channels_last layout (no copy if it is already): the kernels reduce over
    channels, and contiguous channels let them load whole vectors."""
    return t.contiguous(memory_format=torch.channels_last)


def _bank_layout(weight: Tensor) -> Tensor:
    """The bank as the kernels read it: ``[K, kH*kW, C/g, O]``, output channel fastest."""
    K, O, CG, KH, KW = weight.shape
    return weight.permute(0, 3, 4, 2, 1).reshape(K, KH * KW, CG, O).contiguous()


def _geometry(s: _Conv) -> Tuple[int, ...]:
    """The kernels' trailing size arguments: KW, NTAPS, SH, SW, PH, PW, DH, DW."""
    return (s.KW, s.KH * s.KW, *s.stride, *s.padding, *s.dilation)


@functools.lru_cache(maxsize=None)
def _phase_taps(
    kernel: Pair, stride: Pair, padding: Pair, dilation: Pair, device: torch.device
) -> Tuple[Tensor, Tensor]:
    """For each stride phase ``(ih % sh, iw % sw)``: the taps ``kh*kW + kw`` that reach its
    input pixels (``(ih + ph - kh*dh) % sh == 0``, the same along W), and how many there are."""
    (KH, KW), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    table, counts = [], []
    for qh in range(sh):
        for qw in range(sw):
            taps = [kh * KW + kw for kh in range(KH) if (qh + ph - kh * dh) % sh == 0
                    for kw in range(KW) if (qw + pw - kw * dw) % sw == 0]
            counts.append(len(taps))
            table.append(taps + [0] * (KH * KW - len(taps)))
    return (torch.tensor(table, dtype=torch.int32, device=device),
            torch.tensor(counts, dtype=torch.int32, device=device))


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 4 under the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# --------------------------------------------------------------------------- public functions


def fused_forward(
    x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor],
    stride: Pair, padding: Pair, dilation: Pair, groups: int,
) -> Tensor:
    """Dynamic convolution ``out[b] = conv2d(x[b], sum_j attention[b, j] * weight[j], attention[b] @ bias)``.

    Args:
        x: input ``[B, C, H, W]``, any strides (``B`` may be 0).
        weight: kernel bank ``[K, O, C/groups, kH, kW]``.
        attention: mixing weights ``[B, K]``.
        bias: bias bank ``[K, O]`` or ``None``.
        stride, padding, dilation: pairs of ints (symmetric zero padding).
        groups: as in :func:`torch.nn.functional.conv2d`.

    All tensors share one dtype (float16, bfloat16, float32; float64 is meant
    for the interpreter) and device. Returns ``[B, O, H', W']`` in ``x``'s memory
    format (channels_last in, channels_last out) and dtype, ``H'`` as in
    :class:`torch.nn.Conv2d`. Not differentiable by itself: see :func:`fused_backward`.
    """
    s = _check(x, weight, attention, bias, stride, padding, dilation, groups)
    out = torch.empty((s.B, s.O, s.OH, s.OW), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if s.B == 0:
        return out
    pi = attention.contiguous()
    b_eff = out if bias is None else (pi.to(_acc_dtype(x.dtype)) @ bias.to(_acc_dtype(x.dtype))).contiguous()
    x = _nhwc(x)
    args = (x, _bank_layout(weight), pi, b_eff, out,
            s.B, s.H, s.W, s.OH, s.OW, s.OH * s.OW, s.CG, s.OG, s.O, s.groups,
            *x.stride(), *out.stride(), *_geometry(s))

    def grid(meta: Dict[str, Any]) -> Tuple[int]:
        return (triton.cdiv(s.OG, meta["BLOCK_N"]) * triton.cdiv(s.OH * s.OW, meta["BLOCK_M"]) * s.groups
                * triton.cdiv(s.B, meta["SAMPLES"]),)

    _launch("forward", grid, args, {"NK": s.K, "HAS_BIAS": bias is not None, **_precision(x)})
    return out


def fused_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, attention: Tensor, bias: Optional[Tensor],
    stride: Pair, padding: Pair, dilation: Pair, groups: int, output_mask: Sequence[bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`fused_forward` with respect to ``(x, weight, attention, bias)``.

    ``grad_out`` is ``[B, O, H', W']`` (any strides). ``output_mask`` holds four
    bools; a gradient is ``None`` where its entry is False (``grad_bias`` also when
    ``bias`` is None). Each gradient has its input's shape and dtype; ``grad_x``
    has ``x``'s memory format.
    """
    s = _check(x, weight, attention, bias, stride, padding, dilation, groups)
    if grad_out.shape != (s.B, s.O, s.OH, s.OW) or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"grad_out must be {x.dtype} on {x.device} with shape {(s.B, s.O, s.OH, s.OW)}, got "
                         f"{grad_out.dtype} on {grad_out.device} with shape {tuple(grad_out.shape)}")
    if len(output_mask) != 4:
        raise ValueError(f"output_mask must hold 4 bools (x, weight, attention, bias), got {output_mask!r}")
    need_x, need_bank, need_pi, need_bias = (bool(v) for v in output_mask)
    need_bias = need_bias and bias is not None
    acc = _acc_dtype(x.dtype)
    pi = attention.contiguous()
    grad_out, bank = _nhwc(grad_out), _bank_layout(weight)
    grad_x = _input_grad(grad_out, bank, pi, s, memory_format(x)) if need_x else None
    grad_bank: Optional[Tensor] = None
    grad_pi: Optional[Tensor] = None
    if need_bank or need_pi:
        grad_bank, grad_pi = _bank_and_attention_grads(grad_out, _nhwc(x), bank, pi, s, need_bank, need_pi)
    grad_bias = None
    if bias is not None and (need_pi or need_bias):
        g_sum = grad_out.sum(dim=(2, 3), dtype=acc)
        if need_bias:
            grad_bias = (pi.to(acc).t() @ g_sum).to(x.dtype)
        if grad_pi is not None:
            grad_pi += g_sum @ bias.to(acc).t()
    return (grad_x, None if grad_bank is None else grad_bank.to(x.dtype),
            None if grad_pi is None else grad_pi.to(x.dtype), grad_bias)


def _input_grad(grad_out: Tensor, bank: Tensor, pi: Tensor, s: _Conv, fmt: torch.memory_format) -> Tensor:
    """``grad_x`` (in memory format ``fmt``): the transposed convolution of each ``grad_out[b]``
    (channels_last) with its mixed kernel ``mixed_b`` (``bank`` in :func:`_bank_layout`)."""
    grad_x = torch.empty((s.B, s.C, s.H, s.W), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    if s.B == 0:
        return grad_x
    taps, n_taps = _phase_taps((s.KH, s.KW), s.stride, s.padding, s.dilation, grad_out.device)
    (sh, sw) = s.stride
    hq, wq = triton.cdiv(s.H, sh), triton.cdiv(s.W, sw)
    args = (grad_out, bank, pi, taps, n_taps, grad_x,
            s.B, s.H, s.W, s.OH, s.OW, hq, wq, hq * wq, s.CG, s.OG, s.O, s.groups,
            *grad_out.stride(), *grad_x.stride(), *_geometry(s))

    def grid(meta: Dict[str, Any]) -> Tuple[int]:
        return (triton.cdiv(s.CG, meta["BLOCK_N"]) * triton.cdiv(hq * wq, meta["BLOCK_M"]) * sh * sw * s.groups
                * triton.cdiv(s.B, meta["SAMPLES"]),)

    _launch("input_grad", grid, args, {"NK": s.K, **_precision(grad_out)})
    return grad_x


def _bank_and_attention_grads(
    grad_out: Tensor, x: Tensor, bank: Tensor, pi: Tensor, s: _Conv, need_bank: bool, need_pi: bool,
    chunk: Optional[int] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``grad_bank[j] = sum_b pi[b, j] dmixed_b`` (shaped like the weight) and ``grad_pi[b, j] =
    <dmixed_b, Theta_j>`` (without the bias term), in the accumulator dtype, from channels_last ``x``
    and ``grad_out`` and ``bank`` in :func:`_bank_layout`. ``chunk`` samples share a program
    (default: enough chunks that tiles times chunks cover twice the GPU's multiprocessors)."""
    acc = _acc_dtype(x.dtype)
    n_taps = s.KH * s.KW
    weight_shape = (s.K, s.O, s.CG, s.KH, s.KW)
    if s.B == 0:
        return (x.new_zeros(weight_shape, dtype=acc) if need_bank else None,
                pi.new_zeros((0, s.K), dtype=acc) if need_pi else None)
    slots = _bank_grad_tiles(s, largest=False)
    if chunk is None:
        wanted_chunks = triton.cdiv(2 * _processors(x.device), _bank_grad_tiles(s, largest=True))
        chunk = triton.cdiv(s.B, min(s.B, wanted_chunks))
    n_chunks = triton.cdiv(s.B, chunk)
    dummy = x.new_empty(1, dtype=acc)
    bank_partial = x.new_empty((n_chunks, s.K, s.O, s.CG, n_taps), dtype=acc) if need_bank else dummy
    pi_partial = x.new_zeros((slots, s.B, s.K), dtype=acc) if need_pi else dummy
    args = (x, grad_out, bank, pi, bank_partial, pi_partial,
            s.B, s.H, s.W, s.OH, s.OW, s.OH * s.OW, s.CG, s.OG, s.O, s.groups, chunk,
            *x.stride(), *grad_out.stride(), *_geometry(s))

    def grid(meta: Dict[str, Any]) -> Tuple[int]:
        return (triton.cdiv(s.OG, meta["BLOCK_O"]) * n_taps * triton.cdiv(s.CG, meta["BLOCK_R"]) * s.groups
                * n_chunks,)

    constexprs = {"NK": s.K, "NKP": triton.next_power_of_2(s.K), "NEED_BANK": need_bank, "NEED_PI": need_pi,
                  **_precision(x)}
    _launch("bank_grad", grid, args, constexprs)
    grad_bank = bank_partial.sum(0).reshape(weight_shape) if need_bank else None
    return grad_bank, pi_partial.sum(0) if need_pi else None
