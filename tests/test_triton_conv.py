"""The fused Triton kernels (dyconv_teach.kernels.triton_conv) against the per-sample loop and autograd.

Without CUDA the kernels run on CPU tensors under Triton's interpreter, which conftest.py
switches on (TRITON_INTERPRET=1) before triton is imported.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytest
import torch

from dyconv_teach.reference import per_sample_conv

pytest.importorskip("triton")

from dyconv_teach.kernels import triton_conv as tc  # noqa: E402  (only once triton is known to be there)

INTERPRET = not torch.cuda.is_available()
DEVICE = "cpu" if INTERPRET else "cuda"


def _case(B: int, C: int, O: int, K: int, hw: Tuple[int, int], kernel: Tuple[int, int], stride: Tuple[int, int],
          padding: Tuple[int, int], dilation: Tuple[int, int], groups: int, bias: bool) -> Dict[str, Any]:
    return dict(B=B, C=C, O=O, K=K, hw=hw, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                groups=groups, bias=bias)


# Small shapes that together cover the batch (0, 1, 3: a pair of samples per program and a
# lone last one), K in {1, 3}, groups, strides, paddings, dilations, non-square kernels,
# C != O, bias or not, several tiles along every dimension (C/g = 18 and O/g = 20 exceed the
# interpreter's 16-channel tiles, 7x7 = 49 pixels its 32-pixel tiles), and a 1x1 kernel at
# stride 2, whose odd input pixels receive no gradient.
CASES = {
    "3x3": _case(3, 4, 6, 3, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1, True),
    "3x1-stride2-groups2": _case(1, 4, 6, 1, (6, 5), (3, 1), (2, 2), (1, 0), (1, 1), 2, False),
    "1x3-dilated-groups2": _case(3, 6, 4, 3, (7, 8), (1, 3), (1, 2), (0, 2), (1, 2), 2, True),
    "2x2-stride2-dilation2": _case(3, 4, 4, 3, (8, 8), (2, 2), (2, 2), (1, 1), (2, 2), 1, True),
    "3x3-pad2-dilation2": _case(3, 5, 3, 1, (6, 7), (3, 3), (1, 1), (2, 2), (2, 2), 1, False),
    "3x3-stride3": _case(3, 3, 5, 3, (8, 9), (3, 3), (3, 2), (2, 1), (2, 1), 1, True),
    "1x1-stride2": _case(3, 3, 5, 3, (5, 6), (1, 1), (2, 2), (0, 0), (1, 1), 1, True),
    "multi-tile": _case(3, 18, 20, 3, (6, 7), (3, 3), (2, 1), (2, 1), (1, 1), 1, True),
    "empty-batch": _case(0, 4, 6, 3, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2, True),
}
FLOAT32_CASES = ["3x3", "2x2-stride2-dilation2", "multi-tile"]


def _inputs(case: Dict[str, Any], dtype: torch.dtype, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """x, weight, attention, bias (or None) of a case, on DEVICE, requiring gradients."""
    gen = torch.Generator().manual_seed(seed)
    B, C, O, K = case["B"], case["C"], case["O"], case["K"]
    shapes = [(B, C, *case["hw"]), (K, O, C // case["groups"], *case["kernel"]), (B, K)]
    if case["bias"]:
        shapes.append((K, O))
    tensors = [torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for s in shapes]
    tensors[2] = tensors[2].softmax(-1)
    if not case["bias"]:
        tensors.append(None)  # type: ignore[arg-type]
    return tuple(t if t is None else t.requires_grad_() for t in tensors)


def _conv_args(case: Dict[str, Any]) -> Tuple[Any, ...]:
    return case["stride"], case["padding"], case["dilation"], case["groups"]


def _reference(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor],
               case: Dict[str, Any], grad_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Output of the per-sample loop and, given grad_out, autograd's gradients of (x, w, a, b)."""
    stride, padding, dilation, groups = _conv_args(case)
    conv = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out = per_sample_conv(x, w, a, b, **conv) if x.shape[0] else None
    if grad_out is None or out is None:
        return (out,)
    inputs = [t for t in (x, w, a, b) if t is not None]
    return (out, *torch.autograd.grad(out, inputs, grad_out))


def _check_against_reference(case: Dict[str, Any], dtype: torch.dtype, rtol: float, atol: float) -> None:
    x, w, a, b = _inputs(case, dtype)
    out = tc.fused_forward(x.detach(), w.detach(), a.detach(), None if b is None else b.detach(), *_conv_args(case))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
    grads = tc.fused_backward(grad_out, x.detach(), w.detach(), a.detach(), None if b is None else b.detach(),
                              *_conv_args(case), (True, True, True, True))
    assert out.dtype == dtype and all(g is None or g.dtype == dtype for g in grads)
    assert (grads[3] is None) == (b is None)
    if case["B"] == 0:
        assert out.shape == (0, case["O"], *out.shape[2:]) and grads[0].shape == x.shape
        assert torch.equal(grads[1], torch.zeros_like(w)) and grads[2].shape == (0, case["K"])
        assert b is None or torch.equal(grads[3], torch.zeros_like(b))
        return
    expected = _reference(x, w, a, b, case, grad_out)
    for name, got, want in zip(("out", "grad_x", "grad_weight", "grad_attention", "grad_bias"), (out, *grads),
                               expected):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", CASES)
def test_float64_matches_per_sample_loop(name: str) -> None:
    _check_against_reference(CASES[name], torch.float64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_matches_per_sample_loop(name: str) -> None:
    # TF32 on a GPU (as cuDNN) rounds the operands to 10 mantissa bits.
    tol = 1e-4 if INTERPRET else 1e-2
    _check_against_reference(CASES[name], torch.float32, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_per_sample_loop(dtype: torch.dtype) -> None:
    # Tolerances of one rounding of the operands and of the result to 8 (bf16) / 11 (fp16) bits.
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    case = CASES["2x2-stride2-dilation2"]
    x, w, a, b = _inputs(case, torch.float64)
    low = [t.detach().to(dtype) for t in (x, w, a, b)]
    out = tc.fused_forward(*low, *_conv_args(case))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    grads = tc.fused_backward(grad_out.to(dtype), *low, *_conv_args(case), (True, True, True, True))
    # Reference in float64 from the same rounded inputs.
    x64, w64, a64, b64 = (t.double().requires_grad_() for t in low)
    expected = _reference(x64, w64, a64, b64, case, grad_out.to(dtype).double())
    for got, want in zip((out, *grads), expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_channels_last_in_channels_last_out() -> None:
    case = CASES["2x2-stride2-dilation2"]
    x, w, a, b = (t.detach() for t in _inputs(case, torch.float64))
    x_cl = x.to(memory_format=torch.channels_last)
    out = tc.fused_forward(x, w, a, b, *_conv_args(case))
    out_cl = tc.fused_forward(x_cl, w, a, b, *_conv_args(case))
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert out.is_contiguous()
    torch.testing.assert_close(out_cl, out, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    grads = tc.fused_backward(grad_out, x, w, a, b, *_conv_args(case), (True, True, True, True))
    grads_cl = tc.fused_backward(grad_out.to(memory_format=torch.channels_last), x_cl, w, a, b,
                                 *_conv_args(case), (True, True, True, True))
    assert grads_cl[0].is_contiguous(memory_format=torch.channels_last) and not grads_cl[0].is_contiguous()
    for got, want in zip(grads_cl, grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (False, True, True, False), (True, False, True, True)])
def test_output_mask_returns_only_what_was_asked(mask: Tuple[bool, bool, bool, bool]) -> None:
    case = CASES["1x3-dilated-groups2"]
    x, w, a, b = (t.detach() for t in _inputs(case, torch.float64))
    grad_out = torch.randn_like(tc.fused_forward(x, w, a, b, *_conv_args(case)))
    full = tc.fused_backward(grad_out, x, w, a, b, *_conv_args(case), (True, True, True, True))
    some = tc.fused_backward(grad_out, x, w, a, b, *_conv_args(case), mask)
    for wanted, got, want in zip(mask, some, full):
        if wanted:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got is None


def test_grad_bias_is_none_without_bias() -> None:
    case = CASES["3x3-pad2-dilation2"]
    x, w, a, _ = (t if t is None else t.detach() for t in _inputs(case, torch.float64))
    grad_out = torch.randn_like(tc.fused_forward(x, w, a, None, *_conv_args(case)))
    assert tc.fused_backward(grad_out, x, w, a, None, *_conv_args(case), (False, False, True, True))[3] is None


class _FusedConv(torch.autograd.Function):
    """fused_forward with fused_backward as its gradient, for gradcheck (test scaffolding)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                conv: Tuple[Any, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, w, a, b)
        ctx.conv = conv
        return tc.fused_forward(x, w, a, b, *conv)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, w, a, b = ctx.saved_tensors
        return (*tc.fused_backward(grad_out, x, w, a, b, *ctx.conv, ctx.needs_input_grad[:4]), None)


def test_gradcheck_float64() -> None:
    # Finite differences, independent of the reference. fast_mode checks u^T J v for random
    # u, v instead of every entry of J: a full Jacobian takes a minute under the interpreter,
    # and the comparisons with autograd above already check every gradient entry.
    case = _case(2, 3, 4, 2, (4, 3), (2, 2), (2, 1), (1, 1), (1, 1), 1, True)
    x, w, a, b = _inputs(case, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: _FusedConv.apply(*t, _conv_args(case)), (x, w, a, b),
                                    fast_mode=True)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_bank_gradient_is_the_same_for_any_batch_chunking(chunk: int) -> None:
    # Chunks of 2 over B = 3 leave a lone sample in the last chunk.
    case = CASES["3x3"]
    x, w, a, b = (t.detach() for t in _inputs(case, torch.float64))
    s = tc._check(x, w, a, b, *_conv_args(case))
    grad_out = torch.randn_like(tc.fused_forward(x, w, a, b, *_conv_args(case)))
    got = tc._bank_and_attention_grads(grad_out, x, tc._bank_layout(w), a, s, True, True, chunk=chunk)
    want = _reference(*_inputs(case, torch.float64), case, grad_out)
    torch.testing.assert_close(got[0], want[2], rtol=1e-10, atol=1e-10)
    # grad_attention also has the bias term, which fused_backward adds.
    torch.testing.assert_close(got[1] + grad_out.sum((2, 3)) @ b.t(), want[3], rtol=1e-10, atol=1e-10)


def test_backward_is_deterministic() -> None:
    case = CASES["3x3"]
    x, w, a, b = (t.detach() for t in _inputs(case, torch.float32))
    grad_out = torch.randn_like(tc.fused_forward(x, w, a, b, *_conv_args(case)))
    first = tc.fused_backward(grad_out, x, w, a, b, *_conv_args(case), (True, True, True, True))
    second = tc.fused_backward(grad_out, x, w, a, b, *_conv_args(case), (True, True, True, True))
    assert all(torch.equal(f, s) for f, s in zip(first, second))


@pytest.mark.skipif(not INTERPRET, reason="the interpreter's tiles are set by the test; a GPU autotunes")
def test_one_sample_per_program(monkeypatch: pytest.MonkeyPatch) -> None:
    # The other tests run two samples per program (SAMPLES = 2); this one runs the other variant.
    for kernel in ("forward", "input_grad"):
        monkeypatch.setitem(tc._INTERPRETER_META, kernel, {**tc._INTERPRETER_META[kernel], "SAMPLES": 1})
    _check_against_reference(CASES["2x2-stride2-dilation2"], torch.float64, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"w": (3, 4, 3, 3, 3)}, ValueError, r"x has C=4 channels but weight \(3, 4, 3, 3, 3\) with groups=1"),
        ({"w": (3, 5, 2, 3, 3), "groups": 2}, ValueError, r"groups=2 must divide out_channels=5"),
        ({"stride": (0, 1)}, ValueError, r"stride must be >= 1, got \(0, 1\)"),
        ({"x": (2, 4, 2, 2)}, ValueError, r"output size \(H', W'\) = \(0, 0\) < 1"),
        ({"a": (2, 5)}, ValueError, r"attention must have shape \[B, K\] = \[2, 3\]"),
        ({"dtype_w": torch.float32}, TypeError, r"weight has dtype torch.float32 but x has dtype torch.float64"),
        ({"dtype": torch.int64}, TypeError, r"x must be a floating point tensor, got dtype torch.int64"),
        ({"w": (3, 4, 4, 0, 3)}, ValueError, r"weight \(3, 4, 4, 0, 3\) must have every dimension >= 1"),
    ],
)
def test_bad_arguments_are_refused(change: Dict[str, Any], error: type, match: str) -> None:
    dtype = change.get("dtype", torch.float64)
    x = torch.ones(change.get("x", (2, 4, 5, 5)), dtype=dtype, device=DEVICE)
    w = torch.ones(change.get("w", (3, 4, 4, 3, 3)), dtype=change.get("dtype_w", dtype), device=DEVICE)
    a = torch.ones(change.get("a", (2, 3)), dtype=dtype, device=DEVICE)
    with pytest.raises(error, match=match):
        tc.fused_forward(x, w, a, None, change.get("stride", (1, 1)), (0, 0), (1, 1), change.get("groups", 1))


def test_bad_backward_arguments_are_refused() -> None:
    x, w, a, wrong, right = (torch.ones(shape, dtype=torch.float64, device=DEVICE)
                             for shape in [(2, 4, 5, 5), (3, 4, 4, 3, 3), (2, 3), (2, 4, 5, 5), (2, 4, 3, 3)])
    with pytest.raises(ValueError, match=r"grad_out must be torch.float64 on \S+ with shape \(2, 4, 3, 3\)"):
        tc.fused_backward(wrong, x, w, a, None, (1, 1), (0, 0), (1, 1), 1, (True, True, True, True))
    with pytest.raises(ValueError, match=r"output_mask must hold 4 bools"):
        tc.fused_backward(right, x, w, a, None, (1, 1), (0, 0), (1, 1), 1, (True, True))


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_hopper() -> None:
    # The interpreter does not compile: this compiles a few tiles for sm_90a (H100/H200) with
    # the ptxas in the triton wheel, in a process without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tool = Path(__file__).resolve().parents[1] / "tools" / "check_triton_compile.py"
    result = subprocess.run([sys.executable, str(tool), "--quick"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("regs") == 10, result.stdout


def test_the_package_works_without_triton() -> None:
    """Triton is an optional extra: with it unimportable the layer still imports and runs, and
    the package never imports the kernels' module unless the fused strategy is asked for. (torch
    itself imports triton when it is installed, e.g. for torch.utils.flop_counter.)"""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dyconv_teach, dyconv_teach.bench\n"
        "y = dyconv_teach.DynamicConv2d(4, 6, 3)(torch.randn(2, 4, 5, 5))\n"
        "print(tuple(y.shape), 'dyconv_teach.kernels.triton_conv' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "(2, 6, 3, 3) False"
